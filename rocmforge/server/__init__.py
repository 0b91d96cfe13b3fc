"""The OpenAI-compatible HTTP server: ``app`` (routes), ``scheduler`` (continuous batching), ``metrics``."""
