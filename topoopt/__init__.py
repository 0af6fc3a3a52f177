"""topoopt: topology of neural-network weights, measured and steered during training.

The core (clouds, persistence, metrics, penalty, optimizer wrapper, tree cache, merging) needs
only torch and numpy. The tools on it import their own dependencies when first used: TensorBoard
monitoring (`topoopt.monitor`: tensorboard, matplotlib), learning graphs (`topoopt.learning_graphs`:
gudhi, scikit-learn), sparse layers (`topoopt.sparse`) and Lightning (`topoopt.lightning`); their
names below are resolved lazily, so ``import topoopt`` stays light. The research harness (command
line, training runs, datasets, studies) is `topoopt.lab`, which the library never imports.
"""

from importlib import import_module
from typing import Any

from topoopt.cloud import NeuronSample, ParameterLayer, neuron_cloud, sample_neurons
from topoopt.gram import MemoryBudgetError
from topoopt.layers import (
    Coverage,
    TopologyCoverageWarning,
    coverage,
    select_layers,
    topological_layers,
)
from topoopt.many_clouds import h0_deaths_many
from topoopt.measure import LayerMeter, LayerTopology, layer_topology
from topoopt.merging import MergePenalty, MergeReport, merge_neurons
from topoopt.metrics import (
    COMPLEXITY_METRICS,
    METRIC_SPECS,
    METRICS,
    MetricSpec,
    dimensionless_complexity,
    get_metric,
    max_lifetime,
    mean_lifetime,
    metric_spec,
    normalized_persistent_entropy,
    persistent_entropy,
    total_persistence,
)
from topoopt.neurons import LayerPart, register_layer
from topoopt.optimizer import TopoOptimizer
from topoopt.penalty import TopoPenalty
from topoopt.persistence import edge_lengths, h0_deaths, h0_edges, h1_diagram
from topoopt.policies import POLICIES, awaken_policy, calm_policy, collapse_policy, contrast_policy
from topoopt.tree_cache import TreeCache, measure_layers

__version__ = "0.1.0"

# Public names of the tools, imported on first use (PEP 562).
_LAZY = {
    "TopologyMonitor": "topoopt.monitor",
    "TopologyEarlyStopping": "topoopt.early_stopping",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'topoopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "neuron_cloud",
    "ParameterLayer",
    "LayerPart",
    "NeuronSample",
    "sample_neurons",
    "register_layer",
    "coverage",
    "Coverage",
    "TopologyCoverageWarning",
    "h0_deaths",
    "h0_deaths_many",
    "h0_edges",
    "edge_lengths",
    "h1_diagram",
    "persistent_entropy",
    "normalized_persistent_entropy",
    "mean_lifetime",
    "total_persistence",
    "max_lifetime",
    "METRICS",
    "METRIC_SPECS",
    "COMPLEXITY_METRICS",
    "MetricSpec",
    "metric_spec",
    "get_metric",
    "dimensionless_complexity",
    "topological_layers",
    "select_layers",
    "layer_topology",
    "LayerMeter",
    "LayerTopology",
    "MemoryBudgetError",
    "TreeCache",
    "measure_layers",
    "TopoPenalty",
    "TopoOptimizer",
    "POLICIES",
    "calm_policy",
    "awaken_policy",
    "contrast_policy",
    "collapse_policy",
    "merge_neurons",
    "MergePenalty",
    "MergeReport",
    "TopologyMonitor",
    "TopologyEarlyStopping",
]
