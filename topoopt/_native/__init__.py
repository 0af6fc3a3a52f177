"""topoopt's compiled engine (`engine.c`): Prim's loop, a small cloud's tree around its Gram
product, and the forward and backward of tree edge lengths.

Optional: setup.py builds it when a C compiler is present. `engine` is the compiled module, or
None, in which case every caller takes its numpy/torch path (same results; tests set it to None
to check that).
"""

try:
    from topoopt._native import _engine as engine
except ImportError:
    engine = None

__all__ = ["engine"]
