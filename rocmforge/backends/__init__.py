"""Backends run the ops of a forward pass: ``cpu`` (numpy) and the GPU backends; all follow ``base.Backend``."""
