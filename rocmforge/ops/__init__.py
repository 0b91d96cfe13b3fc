"""numpy reference ops: one op per file, each the twin of a GPU kernel in ``kernels/<op>.hip``.

Import the op from its own module (``from rocmforge.ops.rms_norm import rms_norm``); the CPU backend
(`rocmforge.backends.cpu`) calls exactly these functions, and GPU tests compare each kernel against them.
All activations are float32; shapes are documented on each function. To run an op's GPU kernel from Python
next to its twin, call ``rocmforge.ops.dispatch.<op>(..., device="cuda" | "hip" | "cpu")``.
"""
