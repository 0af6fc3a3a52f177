"""Learning graphs (Gabella et al. 2019): weight trajectories recorded during training, their
Mapper graphs, and statistics of those graphs."""

from topoopt.learning_graphs.mapper import (
    KMAPPER_OLD_OVERLAP_AS_GAIN,
    LENSES,
    PAPER_SETTINGS,
    LearningGraph,
    MapperSettings,
    learning_graph,
    lens_values,
)
from topoopt.learning_graphs.statistics import branching_events, graph_statistics, leaf_labels, terminal_leaves
from topoopt.learning_graphs.trajectory import Trajectory, TrajectoryRecorder, load_trajectory, recorded_layers

__all__ = [
    "TrajectoryRecorder",
    "Trajectory",
    "load_trajectory",
    "recorded_layers",
    "MapperSettings",
    "PAPER_SETTINGS",
    "KMAPPER_OLD_OVERLAP_AS_GAIN",
    "LENSES",
    "LearningGraph",
    "learning_graph",
    "lens_values",
    "graph_statistics",
    "branching_events",
    "terminal_leaves",
    "leaf_labels",
]
