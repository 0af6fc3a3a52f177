"""Graph statistics of a learning graph, each defined so that it needs no judgement by eye."""

from __future__ import annotations

from collections import defaultdict

import networkx as nx

from topoopt.learning_graphs.mapper import LearningGraph

__all__ = ["graph_statistics", "branching_events", "terminal_leaves", "leaf_labels"]


def leaf_labels(graph: nx.Graph) -> dict[int, str]:
    """Each terminal leaf's neurons, as a label ("3", or "3,8" for a leaf two neurons share): on
    an output layer, the classes its branches end in."""
    return {leaf: ",".join(str(n) for n in graph.nodes[leaf]["neurons"]) for leaf in terminal_leaves(graph)}


def terminal_leaves(graph: nx.Graph) -> list[int]:
    """Leaves (degree 1) whose mean training step exceeds their neighbour's: the ends of branches.

    Time orients the graph: a trajectory that starts as one group and splits into k groups has k
    terminal leaves and one initial leaf (earlier than its neighbour), which is not counted.
    """
    ends = []
    for node in graph.nodes:
        if graph.degree(node) == 1:
            (neighbour,) = graph.neighbors(node)
            if graph.nodes[node]["mean_step"] > graph.nodes[neighbour]["mean_step"]:
                ends.append(node)
    return ends


def branching_events(graph: nx.Graph) -> list[dict]:
    """Where the clusters of one cover element split into several as training goes on.

    An event is a node u and a cover element (patch) P such that at least two nodes of P are
    neighbours of u and later than u (greater mean step) and not joined to each other. Reported:
    u's mean step (the step while its neurons were still together), the children's mean steps,
    and which neurons went to which child.
    """
    events = []
    for node in graph.nodes:
        step = graph.nodes[node]["mean_step"]
        later = defaultdict(list)
        for neighbour in graph.neighbors(node):
            if graph.nodes[neighbour]["mean_step"] > step:
                later[graph.nodes[neighbour]["patch"]].append(neighbour)
        for patch, children in later.items():
            separate = [c for c in children if not any(graph.has_edge(c, o) for o in children if o != c)]
            if len(children) >= 2 and len(separate) >= 2:
                events.append({
                    "node": int(node),
                    "step": float(step),
                    "patch": list(patch),
                    "children": [{"node": int(c), "mean_step": float(graph.nodes[c]["mean_step"]),
                                  "neurons": graph.nodes[c]["neurons"]} for c in sorted(children)],
                })
    return sorted(events, key=lambda e: e["step"])


def graph_statistics(learning: LearningGraph | nx.Graph) -> dict:
    """nodes, edges, components, cycles (cycle rank E − V + C), leaves (degree-1 nodes),
    isolated nodes, branches (terminal leaves, see `terminal_leaves`) and branching events."""
    graph = learning.graph if isinstance(learning, LearningGraph) else learning
    components = nx.number_connected_components(graph) if graph.number_of_nodes() else 0
    events = branching_events(graph)
    return {
        "nodes": graph.number_of_nodes(),
        "edges": graph.number_of_edges(),
        "components": components,
        "cycles": graph.number_of_edges() - graph.number_of_nodes() + components,
        "leaves": sum(1 for n in graph.nodes if graph.degree(n) == 1),
        "isolated": sum(1 for n in graph.nodes if graph.degree(n) == 0),
        "branches": len(terminal_leaves(graph)),
        "branching_events": len(events),
    }
