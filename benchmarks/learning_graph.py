"""A learning graph of a 201-snapshot × 100-neuron × 784-dim trajectory: topoopt (gudhi's
MapperComplex) against KeplerMapper at equivalent parameters, in one run.

Both get the same lens (L2 norm after PCA-20), the same cover (30 intervals, overlap 0.4975:
KeplerMapper ≥ 1.2's perc_overlap equals gudhi's gain) and the same DBSCAN(eps, min_samples=2)
on the PCA-20 points; the script checks that the two graphs have the same node and edge counts.

    python benchmarks/learning_graph.py                       # a synthetic branching trajectory
    python benchmarks/learning_graph.py --trajectory DIR --layer fc1   # a recorded one
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from topoopt.learning_graphs import MapperSettings, learning_graph, lens_values, load_trajectory


def synthetic_trajectory(snapshots=201, neurons=100, dim=784, groups=12, seed=0):
    """Neurons start together and drift apart in `groups` random-walk branches, with noise."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, groups, neurons)
    steps = rng.normal(scale=0.02, size=(snapshots, groups, dim)).cumsum(axis=0)
    clouds = steps[:, group, :] + 0.002 * rng.normal(size=(snapshots, neurons, dim)).cumsum(axis=0)
    return clouds.reshape(-1, dim), np.repeat(np.arange(snapshots), neurons), np.tile(np.arange(neurons), snapshots)


def kepler_graph(points, settings: MapperSettings):
    import kmapper
    from sklearn.cluster import DBSCAN

    lens, reduced = lens_values(points, settings)
    mapper = kmapper.KeplerMapper(verbose=0)
    return mapper.map(lens, reduced, cover=kmapper.Cover(n_cubes=settings.intervals, perc_overlap=settings.gain),
                      clusterer=DBSCAN(eps=settings.eps, min_samples=settings.min_samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectory", default=None)
    parser.add_argument("--layer", default="fc1")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.trajectory:
        trajectory = load_trajectory(args.trajectory, args.layer)
        points, steps, neurons = trajectory.points, trajectory.point_steps(), trajectory.neuron
    else:
        points, steps, neurons = synthetic_trajectory()
    settings = MapperSettings(intervals=30, eps=args.eps)
    print(f"trajectory: {points.shape[0]} points × {points.shape[1]} dims; lens {settings.lens}, "
          f"{settings.intervals} intervals, gain {settings.gain:.4f}, DBSCAN eps {settings.eps}\n")
    ours, theirs = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        graph = learning_graph(points, steps, neurons, settings)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        kepler = kepler_graph(points, settings)
        theirs.append(time.perf_counter() - start)
    kepler_edges = {tuple(sorted((a, b))) for a, targets in kepler["links"].items() for b in targets}
    print(f"{'method':<32} {'median s':>9} {'nodes':>6} {'edges':>6}")
    print(f"{'topoopt (gudhi MapperComplex)':<32} {statistics.median(ours):>9.2f} {graph.graph.number_of_nodes():>6} "
          f"{graph.graph.number_of_edges():>6}")
    print(f"{'KeplerMapper ' + __import__('kmapper').__version__:<32} {statistics.median(theirs):>9.2f} "
          f"{len(kepler['nodes']):>6} {len(kepler_edges):>6}")
    same = graph.graph.number_of_nodes() == len(kepler["nodes"]) and graph.graph.number_of_edges() == len(kepler_edges)
    print(f"\nsame node and edge counts: {same}")


if __name__ == "__main__":
    main()
