"""Merging neurons along the H0 tree: exact copies merge without changing the function, the model
shrinks by exactly what was asked, the groups are single linkage's (scipy), and what cannot be
merged is refused by name."""

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from torch import nn

from topoopt.lab.models import build_mlp
from topoopt.merging import merge_neurons, tree_clusters

torch.manual_seed(0)


def duplicated_mlp(copies=3):
    """784-… shaped small MLP whose hidden layers hold each of their neurons `copies` times."""
    model = build_mlp("mlp:10-12-9-4")
    with torch.no_grad():
        for name, unique in (("fc1", 4), ("fc2", 3)):
            layer = getattr(model, name)
            rows = torch.arange(layer.out_features) % unique
            layer.weight.copy_(layer.weight[rows])
            layer.bias.copy_(layer.bias[rows])
    return model


def test_exact_copies_merge_without_changing_the_function():
    model = duplicated_mlp()
    merged, report = merge_neurons(model, {"fc1": 4, "fc2": 3})
    x = torch.randn(64, 10)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-6)
    assert [m.neurons_after for m in report.layers] == [4, 3]
    assert all(m.longest_merged_edge == 0.0 for m in report.layers)
    assert [tuple(getattr(merged, name).weight.shape) for name in ("fc1", "fc2", "fc3")] == [(4, 10), (3, 4), (4, 3)]
    assert report.parameters_before == (12 * 10 + 12) + (9 * 12 + 9) + (4 * 9 + 4)
    assert report.parameters_after == sum(p.numel() for p in merged.parameters())
    assert report.parameters_after == (4 * 10 + 4) + (3 * 4 + 3) + (4 * 3 + 4)
    assert model.fc1.weight.shape == (12, 10)  # the input model is left as it was


def test_conv_copies_merge_without_changing_the_function():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 2))
    with torch.no_grad():
        rows = torch.arange(8) % 2
        model[0].weight.copy_(model[0].weight[rows])
        model[0].bias.copy_(model[0].bias[rows])
    merged, report = merge_neurons(model, {"0": 2})
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-6)
    assert merged[0].out_channels == 2 and merged[2].in_channels == 2


def test_a_cnn_merges_through_pooling_and_the_flatten_into_its_linear_layer():
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 4, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(4 * 9, 5))
    with torch.no_grad():
        for index, unique in ((0, 3), (3, 2)):
            rows = torch.arange(model[index].out_channels) % unique
            model[index].weight.copy_(model[index].weight[rows])
            model[index].bias.copy_(model[index].bias[rows])
    merged, report = merge_neurons(model, {"0": 3, "3": 2})
    x = torch.randn(4, 1, 14, 14)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-6)
    assert merged[3].in_channels == 3 and merged[7].in_features == 2 * 9
    assert report.parameters_after == sum(p.numel() for p in merged.parameters())
    # A flatten of other dimensions, or a Linear reading part of a channel, is refused by name.
    odd = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(start_dim=2), nn.Linear(36, 2))
    with pytest.raises(ValueError, match=r"'1' \(Flatten\) sits between it and the next layer"):
        merge_neurons(odd, {"0": 2})


def test_groups_are_single_linkage_clusters():
    """Against scipy's single-linkage clustering cut into k groups."""
    rng = np.random.default_rng(3)
    cloud = torch.tensor(np.concatenate([rng.normal(c, 0.05, (6, 4)) for c in (0.0, 1.0, 2.5)]), dtype=torch.float64)
    for k in (1, 2, 3, 5, 18):
        groups, _ = tree_clusters(cloud, k)
        labels = fcluster(linkage(cloud.numpy(), method="single"), t=k, criterion="maxclust")
        reference = sorted((sorted(np.flatnonzero(labels == label).tolist()) for label in set(labels)),
                           key=lambda g: g[0])
        assert groups == reference


def test_near_copies_change_the_function_little_and_fractions_are_rounded():
    model = duplicated_mlp()
    with torch.no_grad():
        model.fc1.weight.add_(1e-4 * torch.randn_like(model.fc1.weight))
    merged, report = merge_neurons(model, 1 / 3)
    assert [m.neurons_after for m in report.layers] == [4, 3]
    x = torch.randn(64, 10)
    assert (merged(x) - model(x)).abs().max() < 1e-2
    assert 0 < report.layers[0].longest_merged_edge < 1e-3


def test_what_cannot_be_merged_is_refused_by_name():
    with pytest.raises(ValueError, match=r"layer 'fc2' cannot be merged: it is the last layer"):
        merge_neurons(build_mlp("mlp:4-5-3"), {"fc2": 2})
    normed = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) sits between it and the next layer"):
        merge_neurons(normed, {"0": 3})
    with pytest.raises(KeyError, match="'fc9' is not a Linear/Conv layer"):
        merge_neurons(build_mlp("mlp:4-5-3"), {"fc9": 2})
    with pytest.raises(ValueError, match="Invalid merge_neurons keep for layer 'fc1': 7. It must be at most"):
        merge_neurons(build_mlp("mlp:4-5-3"), {"fc1": 7})
    with pytest.raises(TypeError, match="Invalid model: .*It must be an nn.Sequential"):
        merge_neurons(nn.Linear(3, 3), 0.5)


def test_the_merge_penalty_gathers_neurons_so_that_merging_changes_little():
    """Minimising the sum of the N − k shortest deaths pulls the neurons into k groups: after it,
    merging to k changes the network's output far less than merging the untouched network."""
    from topoopt.merging import MergePenalty

    torch.manual_seed(1)
    model = build_mlp("mlp:10-24-4")
    penalty = MergePenalty(model, keep=6, weight=1.0)
    assert penalty.merged_edges == {"fc1": 18}
    x = torch.randn(256, 10)
    before = merge_neurons(model, {"fc1": 6})[0]
    with torch.no_grad():
        change_before = float((before(x) - model(x)).abs().mean())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    start = float(penalty())
    for _ in range(300):
        optimizer.zero_grad()
        penalty().backward()
        optimizer.step()
    assert penalty.last_values["fc1"] < 0.05 * start  # 9.07 → 0.18 (each edge within a step of 0)
    after = merge_neurons(model, {"fc1": 6})[0]
    with torch.no_grad():
        assert float((after(x) - model(x)).abs().mean()) < 0.3 * change_before  # measured: 0.027 against 0.151


def test_keep_is_validated_alike_and_unmergeable_layers_are_refused():
    from topoopt.merging import MergePenalty
    from topoopt.sparse import SparseLinear

    model = build_mlp("mlp:4-6-3")
    for bad in (-0.5, float("nan"), "2", True):
        with pytest.raises(ValueError, match="keep"):
            MergePenalty(model, keep=bad)
    with pytest.raises(KeyError, match="fc9"):
        MergePenalty(model, keep={"fc9": 2})
    assert MergePenalty(model, keep=np.int64(2)).merged_edges == {"fc1": 4}
    assert merge_neurons(model, {"fc1": np.int64(2)})[1].layers[0].neurons_after == 2
    masked = nn.Sequential(SparseLinear(4, 6, torch.ones(6, 4)), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="only plain Linear and ConvNd layers are merged"):
        merge_neurons(masked, {"0": 3})


def test_the_merging_study_runs_quick_and_resumes(tmp_path, capsys):
    from topoopt.lab.studies import merging as study

    summary = study.main(["--quick", "--out", str(tmp_path)])
    assert summary["seeds"] == [0, 1] and (tmp_path / "table.md").exists()
    assert "2 seed(s) cannot tell" in capsys.readouterr().out
    first = (tmp_path / "seed0.json").read_text()
    study.main(["--quick", "--out", str(tmp_path)])  # finished seeds are read back, not rerun
    assert (tmp_path / "seed0.json").read_text() == first


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_every_baseline_removes_exactly_the_asked_neurons_and_keeps_a_working_network(model_name):
    from topoopt.lab.studies import merging as study

    torch.manual_seed(0)
    model = study.build(model_name)
    hidden = study.HIDDEN[model_name]
    x = torch.rand(3, 784)
    for method in study.ALL_METHODS:
        small = study.compress(model, method, 0.5, hidden)
        widths = [getattr(small, name).weight.shape[0] for name in hidden]
        assert widths == [getattr(model, name).weight.shape[0] // 2 for name in hidden], method
        assert small(x).shape == (3, 10)
    # Pruning without compensation is removing: the kept neurons' incoming weights are untouched.
    pruned = study.prune(model, 0.5, compensate=False, hidden=hidden)
    first = next(iter(hidden))
    rows = {tuple(r.flatten().tolist()) for r in getattr(model, first).weight}
    assert all(tuple(r.flatten().tolist()) in rows for r in getattr(pruned, first).weight)


def test_cosine_merging_of_an_exact_copy_keeps_the_cnn_function():
    from topoopt.lab.studies import merging as study

    torch.manual_seed(1)
    model = study.build("cnn")
    with torch.no_grad():
        model.conv2.weight[1] = model.conv2.weight[0]  # filter 1 copies filter 0 …
        model.conv2.bias[1] = model.conv2.bias[0]
        model.conv2.weight[0].mul_(10)  # … and filter 0 is the larger, so L1 keeps it (scaled by 10)
        model.conv2.bias[0].mul_(10)
        model.conv2.weight[1].div_(10)
        model.conv2.bias[1].div_(10)
    keep_all_but_one = 1 - 31 / 32
    small = study.prune(model, keep_all_but_one, compensate=True, hidden={"conv2": "fc"})
    x = torch.rand(5, 784)
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)  # ReLU is positively homogeneous


def test_a_results_folder_of_another_model_or_method_set_is_refused(tmp_path, capsys):
    from topoopt.lab.studies import merging as study

    (tmp_path / "seed0.json").write_text('{"seed": 0, "model": "mlp", "results": [{"method": "l1"}]}')
    with pytest.raises(SystemExit):
        study.main(["--quick", "--model", "cnn", "--out", str(tmp_path)])
    assert "holds the mlp with methods l1 trained None epochs, not the cnn with l1, cosine, h0 for 2" in \
        capsys.readouterr().err


def test_the_one_sided_signed_rank_test_is_scipys_exact_one():
    from scipy.stats import wilcoxon

    from topoopt.lab.studies.merging import signed_rank_greater, signed_rank_two_sided

    rng = np.random.default_rng(0)
    for _ in range(5):
        d = (rng.normal(0.3, 1, 9)).tolist()
        assert signed_rank_greater(d) == pytest.approx(wilcoxon(d, alternative="greater", method="exact").pvalue)
        assert signed_rank_two_sided(d) == pytest.approx(wilcoxon(d, method="exact").pvalue)
