"""Groups of neurons and online branching events (topoopt.groups), and their TensorBoard logs."""

import pytest
import torch
from torch import nn

from topoopt import TreeCache
from topoopt.groups import BranchingDetector, group_count, group_sizes, group_threshold
from topoopt.lab.models import build_mlp
from topoopt.monitor import TopologyMonitor


def clustered(sizes, spread=1e-3, separation=1.0, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = separation * torch.randn(len(sizes), d, generator=g, dtype=torch.float64)
    return torch.cat([c + spread * torch.randn(k, d, generator=g, dtype=torch.float64) for c, k in zip(centres, sizes)])


def tree_deaths(cloud):
    trees = TreeCache()
    u, v = trees.edges("layer", cloud)
    return trees.deaths_in_tree_order("layer", cloud), u, v


@pytest.mark.parametrize("sizes", [[30, 20, 5], [10, 10], [40]])
def test_tight_groups_far_apart_are_counted_with_their_sizes(sizes):
    cloud = clustered(sizes)
    deaths, u, v = tree_deaths(cloud)
    assert group_count(deaths) == len(sizes)
    assert group_sizes(deaths, u, v, cloud.shape[0]) == sorted(sizes, reverse=True)


def test_a_noise_cloud_is_one_group_at_any_scale():
    for scale in (1e-8, 1.0, 1e4):
        cloud = scale * torch.randn(100, 784, dtype=torch.float64)
        assert group_count(tree_deaths(cloud)[0]) == 1


def test_coinciding_neurons_split_by_any_positive_gap():
    cloud = torch.cat([torch.zeros(6, 3), torch.ones(4, 3)]).double()
    deaths, u, v = tree_deaths(cloud)
    assert float(deaths.median()) == 0 and group_count(deaths) == 2
    assert group_sizes(deaths, u, v, 10) == [6, 4]
    assert group_count(torch.zeros(9, dtype=torch.float64)) == 1


def test_threshold_is_ratio_times_the_median_gap():
    deaths = torch.tensor([1.0, 2.0, 3.0, 50.0, 7.0])
    assert group_threshold(deaths, 4.0) == 12.0 and group_count(deaths, 4.0) == 2
    with pytest.raises(ValueError, match="Invalid ratio: 1"):
        group_threshold(deaths, 1)


def test_detector_confirms_rises_that_hold_and_ignores_flapping():
    detector = BranchingDetector(patience=3)
    counts = [1, 1, 2, 1, 2, 1, 3, 3, 2, 2, 2, 2, 1, 1, 1, 4, 4, 4]
    events = [(step, detector.update(count, step)) for step, count in enumerate(counts)]
    rises = [(step, rise) for step, rise in events if rise is not None]
    # 3,3,2 at steps 6-8 hold above 1 for three measurements: confirmed as 2 (the smallest).
    # The fall to 1 at 12-14 is confirmed without an event, the rise to 4 at 15-17 is one.
    assert rises == [(8, (6, 1, 2)), (17, (15, 1, 4))]
    assert detector.confirmed == 4
    restored = BranchingDetector(3)
    restored.load_state_dict(detector.state_dict())
    assert restored.update(5, 18) is None and restored.confirmed == 4


class Splitting(nn.Module):
    """A layer whose neurons we move by hand: one group, then two, then three."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 12, bias=False)


def test_monitor_logs_groups_and_branching_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = Splitting()
    seen = []
    monitor = TopologyMonitor(model, log_dir=tmp_path, metrics="mean_lifetime", branching_patience=2,
                              on_branching=lambda layer, step, sizes: seen.append((layer, step, sizes)))
    g = torch.Generator().manual_seed(0)
    noise = 1e-3 * torch.randn(12, 8, generator=g)
    phases = [torch.zeros(12, 8), torch.zeros(12, 8), torch.zeros(12, 8)]
    phases[1][:4] += 5.0
    phases[2][:4] += 5.0
    phases[2][4:7] -= 5.0
    schedule = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for step, phase in enumerate(schedule):
        with torch.no_grad():
            model.fc.weight.copy_(phases[phase] + noise)
        monitor.step(step)
    monitor.close()
    assert seen == [("fc", 4, [8, 4]), ("fc", 7, [5, 4, 3])]
    assert [(e.first_seen, e.groups_before, e.groups) for e in monitor.events] == [(3, 1, 2), (6, 2, 3)]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("topology/fc/groups")] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [(e.step, e.value) for e in events.Scalars("branching/fc")] == [(4, 2), (7, 3)]


def test_groups_can_be_turned_off():
    monitor = TopologyMonitor(build_mlp("mlp:4-6-2"), writer=_Null(), groups_ratio=None)
    monitor.step(0)
    assert "groups" not in monitor.last["fc1"]


class _Null:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_an_absolute_scale_counts_what_a_relative_threshold_cannot():
    # neurons on a line, gaps 0.3, 0.3, 0.3, 0.9, 0.3: the 0.9 gap is 3 × the median, below the
    # relative threshold (4 × 0.3), above an absolute scale of 0.5
    cloud = torch.tensor([[0.0], [0.3], [0.6], [0.9], [1.8], [2.1]], dtype=torch.float64)
    deaths, u, v = tree_deaths(cloud)
    assert group_count(deaths) == 1
    assert group_count(deaths, scale=0.5) == 2
    assert group_sizes(deaths, u, v, 6, scale=0.5) == [4, 2]
    assert group_count(deaths, scale=1.0) == 1


def test_monitor_counts_groups_at_a_per_layer_absolute_scale():
    model = build_mlp("mlp:4-6-2")
    monitor = TopologyMonitor(model, writer=_Null(), groups_ratio=None, groups_scale={"fc2": 0.0})
    monitor.step(0)
    assert "groups" not in monitor.last["fc1"]  # no ratio and no scale for fc1
    assert monitor.last["fc2"]["groups"] == 2.0  # two distinct output neurons: any gap above 0 separates
    with pytest.raises(ValueError, match="groups_scale names layer 'fc9'"):
        TopologyMonitor(model, writer=_Null(), groups_scale={"fc9": 0.1})
    with pytest.raises(ValueError, match="Invalid groups_scale for layer 'fc1'"):
        TopologyMonitor(model, writer=_Null(), groups_scale=-1.0)
