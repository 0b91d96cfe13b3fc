"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""


class RocmforgeError(Exception):
    """Base of every error rocmforge raises on purpose."""


class ModelFileError(RocmforgeError):
    """The file is not a usable GGUF: bad magic, truncated, missing or misshapen tensor."""


class UnsupportedError(RocmforgeError):
    """A valid file that uses something rocmforge does not run (architecture, quant type, tokenizer)."""


class FetchError(RocmforgeError):
    """A registry model could not be fetched (no network, unknown name, checksum mismatch)."""


class ContextOverflowError(RocmforgeError):
    """A prompt plus the requested tokens does not fit the context window."""


class DeviceError(RocmforgeError):
    """A GPU was asked for and is missing, or has too little free memory."""
