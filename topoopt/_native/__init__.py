"""topoopt's compiled engine (`engine.c`): Prim's loop; a small cloud's whole tree search (its
Gram product, distances, near pairs in float64, Prim); the forward and backward of tree edge
lengths; the metrics of a diagram with their slopes (`topoopt.host_metrics`); finiteness checks,
sums of squares and byte comparisons of CPU tensors; `TopoOptimizer`'s copy of the weights
before a step and its check-and-scale of the step.

Optional: setup.py builds it when a C compiler is present. `engine` is the compiled module, or
None, in which case every caller takes its numpy/torch path (the same results; tests set it to
None to check that).
"""

try:
    from topoopt._native import _engine as engine
except ImportError:
    engine = None

__all__ = ["engine"]
