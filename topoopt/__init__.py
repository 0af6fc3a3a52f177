"""topoopt: topology of neural-network weights, measured and steered during training."""

from topoopt.cloud import neuron_cloud
from topoopt.layers import LayerTopology, layer_topology, select_layers, topological_layers
from topoopt.data import DATASETS, DatasetUnavailable, load_dataset, stratified_subset
from topoopt.monitor import TopologyMonitor
from topoopt.optimizer import POLICIES, TopoOptimizer, awaken_policy, calm_policy, contrast_policy
from topoopt.penalty import TopoPenalty
from topoopt.metrics import (
    METRICS,
    get_metric,
    max_lifetime,
    mean_lifetime,
    normalized_persistent_entropy,
    persistent_entropy,
    total_persistence,
)
from topoopt.persistence import edge_lengths, h0_deaths, h0_edges, h1_diagram
from topoopt.spanning_tree import MemoryBudgetError
from topoopt.tree_cache import TreeCache

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "neuron_cloud",
    "h0_deaths",
    "h0_edges",
    "edge_lengths",
    "h1_diagram",
    "persistent_entropy",
    "normalized_persistent_entropy",
    "mean_lifetime",
    "total_persistence",
    "max_lifetime",
    "METRICS",
    "get_metric",
    "topological_layers",
    "select_layers",
    "layer_topology",
    "LayerTopology",
    "MemoryBudgetError",
    "TreeCache",
    "TopoPenalty",
    "TopoOptimizer",
    "POLICIES",
    "calm_policy",
    "awaken_policy",
    "contrast_policy",
    "TopologyMonitor",
    "DATASETS",
    "DatasetUnavailable",
    "load_dataset",
    "stratified_subset",
]
