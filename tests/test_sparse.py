"""SparseLinear, the mask generators, and graph measures against networkx and closed forms."""

import math

import networkx as nx
import numpy as np
import pytest
import torch

from topoopt import h0_deaths, neuron_cloud
from topoopt.sparse import (
    MASK_FAMILIES,
    SparseLinear,
    banded,
    block_diagonal,
    graph_measures,
    make_mask,
    ramanujan_expander,
    rewired_banded,
)


def bipartite_graph(mask):
    m = np.asarray(mask)
    graph = nx.Graph()
    graph.add_nodes_from(range(sum(m.shape)))
    rows, cols = np.nonzero(m)
    graph.add_edges_from(zip(rows.tolist(), (cols + m.shape[0]).tolist()))
    return graph


def test_complete_bipartite_graph():
    """K_{m,n}: σ₁ = √(mn), σ₂ = 0, λ₂ = min(m, n), density 1."""
    measures = graph_measures(torch.ones(3, 5))
    assert measures.sigma1 == pytest.approx(math.sqrt(15)) and measures.sigma2 == pytest.approx(0, abs=1e-12)
    assert measures.algebraic_connectivity == pytest.approx(3.0)
    assert measures.density == 1.0 and measures.connected


def test_cycle():
    """banded(n, n, 2) is the cycle C_2n: λ₂ = 2 − 2cos(2π/2n), σ₁ = 2."""
    n = 6
    measures = graph_measures(banded(n, n, 2))
    assert measures.algebraic_connectivity == pytest.approx(2 - 2 * math.cos(2 * math.pi / (2 * n)))
    assert measures.sigma1 == pytest.approx(2.0)
    assert nx.is_isomorphic(bipartite_graph(banded(n, n, 2)), nx.cycle_graph(2 * n))


def test_disconnected_graph():
    measures = graph_measures(block_diagonal(8, 8, 3, blocks=2))
    assert not measures.connected and measures.algebraic_connectivity == pytest.approx(0, abs=1e-9)
    assert measures.spectral_gap == pytest.approx(0, abs=1e-9)  # two equal top singular values


@pytest.mark.parametrize("family", MASK_FAMILIES)
def test_measures_match_networkx_and_numpy(family):
    mask = make_mask(family, 24, 24, 3, seed=2)
    measures = graph_measures(mask)
    graph = bipartite_graph(mask)
    assert measures.connected == nx.is_connected(graph)
    if measures.connected:
        laplacian = nx.laplacian_matrix(graph).toarray().astype(float)
        assert measures.algebraic_connectivity == pytest.approx(np.sort(np.linalg.eigvalsh(laplacian))[1], rel=1e-6)
    adjacency_eigs = np.sort(np.linalg.eigvalsh(nx.to_numpy_array(graph)))[::-1]
    assert measures.sigma1 == pytest.approx(adjacency_eigs[0])
    assert measures.sigma2 == pytest.approx(adjacency_eigs[1], abs=1e-9)
    assert measures.density == pytest.approx(graph.number_of_edges() / (24 * 24))


@pytest.mark.parametrize("family", ["banded", "rewired", "biregular", "expander", "block_diagonal"])
@pytest.mark.parametrize("shape", [(32, 32), (20, 48), (48, 20)])
def test_regular_families_keep_degrees_balanced(family, shape):
    out_features, in_features = shape
    mask = make_mask(family, out_features, in_features, 4, seed=0)
    assert torch.all(mask.sum(dim=1) == 4)
    columns = mask.sum(dim=0)
    assert (columns - out_features * 4 / in_features).abs().max() < 1 + 1e-9
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_masks_are_seeded():
    assert torch.equal(make_mask("biregular", 16, 16, 3, seed=4), make_mask("biregular", 16, 16, 3, seed=4))
    assert not torch.equal(make_mask("biregular", 16, 16, 3, seed=4), make_mask("biregular", 16, 16, 3, seed=5))


def test_rewiring_sweeps_from_banded_to_random():
    base = banded(32, 32, 4)
    assert torch.equal(rewired_banded(32, 32, 4, 0.0, seed=1), base)
    gaps = [graph_measures(rewired_banded(32, 32, 4, p, seed=1)).spectral_gap for p in (0.0, 0.1, 1.0)]
    assert gaps[0] < gaps[1] < gaps[2] + 0.2 and gaps[2] > 5 * gaps[0]


def test_expander_meets_the_ramanujan_bound():
    measures = graph_measures(ramanujan_expander(32, 32, 4, seed=0))
    assert measures.sigma2 <= measures.ramanujan_bound


def test_unknown_family_lists_valid_ones():
    with pytest.raises(ValueError, match="Invalid mask family: 'star'. It must be one of 'banded', 'rewired'"):
        make_mask("star", 4, 4, 2, seed=0)


# ---- SparseLinear ----

def test_masked_weights_stay_zero_through_optimizers():
    mask = make_mask("biregular", 12, 10, 3, seed=0)
    for make in (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
                 lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1),
                 lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5)):
        torch.manual_seed(0)
        layer = SparseLinear(10, 12, mask)
        optimizer = make(layer.parameters())
        for _ in range(5):
            optimizer.zero_grad()
            layer(torch.randn(8, 10)).pow(2).sum().backward()
            optimizer.step()
        assert torch.all(layer.weight[mask == 0] == 0)
        assert torch.all(layer.weight[mask == 1] != 0)


def test_mask_is_saved_and_init_uses_real_fan_in():
    mask = make_mask("xnet", 40, 200, 5, seed=0)
    layer = SparseLinear(200, 40, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.state_dict()["mask"], mask)
    assert layer.weight.abs().max() <= 1 / math.sqrt(5) + 1e-7
    assert layer.weight.abs().max() > 0.8 / math.sqrt(5)
    assert layer.density == pytest.approx(5 / 200)


def test_topology_applies_to_sparse_layers():
    layer = SparseLinear(16, 16, banded(16, 16, 3))
    cloud = neuron_cloud(layer)
    assert cloud.shape == (16, 16)
    h0_deaths(cloud).sum().backward()
    assert torch.all(layer.weight.grad[layer.mask == 0] == 0)


def test_bad_masks_are_rejected():
    with pytest.raises(ValueError, match=r"mask must have shape \(out_features, in_features\) = \(3, 4\)"):
        SparseLinear(4, 3, torch.ones(4, 3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        SparseLinear(2, 2, torch.full((2, 2), 0.5))


def test_families_draw_from_their_own_seed_streams():
    """The same index in two families gives different seeds, so no two generators that build on
    the same random draw can return the same mask."""
    from topoopt.sparse import MASK_FAMILIES, family_seed

    seeds = {family_seed(family, index, layer) for family in MASK_FAMILIES for index in range(6) for layer in range(3)}
    assert len(seeds) == len(MASK_FAMILIES) * 6 * 3
    assert family_seed("biregular", 2, 1) == family_seed("biregular", 2, 1)
    with pytest.raises(ValueError, match="Invalid mask family: 'star'. It must be one of"):
        family_seed("star", 0)


def test_expander_is_not_the_biregular_mask_of_its_seed():
    """Regression: the expander used to try random_biregular(seed) first and keep it when it met
    the bound, so 5 of 6 'expanders' were the biregular masks of the same seeds."""
    for seed in range(6):
        assert not torch.equal(ramanujan_expander(64, 64, 4, seed=seed), make_mask("biregular", 64, 64, 4, seed=seed))


def test_mask_fingerprint_detects_identical_wirings():
    from topoopt.sparse import mask_fingerprint

    a, b = make_mask("biregular", 16, 24, 3, seed=0), make_mask("biregular", 16, 24, 3, seed=1)
    assert mask_fingerprint([a, b]) == mask_fingerprint([a.clone(), b.clone()])
    assert mask_fingerprint([a, b]) != mask_fingerprint([b, a]) != mask_fingerprint([a])
    assert mask_fingerprint(a) != mask_fingerprint(a.T.contiguous())


def test_study_drops_duplicate_networks_and_refuses_to_analyse_them():
    from topoopt.lab.studies.sparse_topologies import StudyConfig, analyse, make_cells, unique_specs

    spec = {"family": "biregular", "degree": 4, "mask_seed": 0, "p": 0.0}
    kept, duplicates = unique_specs([spec, dict(spec, family="rewired", p=0.3), dict(spec)], 64, 64, 3)
    assert [s["family"] for s in kept] == ["biregular", "rewired"]
    assert duplicates == [{"mask_id": "biregular-d4-m0-p0.0", "same_as": "biregular-d4-m0-p0.0",
                           "mask_hash": kept[0]["mask_hash"]}]
    cells, duplicates = make_cells(StudyConfig.quick(), 64)
    assert duplicates == []
    hashes = {c["mask_id"]: c["mask_hash"] for c in cells}
    assert len(set(hashes.values())) == len(hashes)
    record = {"family": "biregular", "degree": 4, "density": 0.06, "min_spectral_gap": 1.0, "min_normalized_gap": 0.1,
              "min_algebraic_connectivity": 0.5, "min_ramanujan_margin": 0.1, "all_connected": True,
              "isolated_units": 0, "unused_inputs": 0, "mask_hash": "same", "test_accuracy": 0.9, "epochs_to_90": 1}
    with pytest.raises(ValueError, match="deduplicate"):
        analyse([dict(record, mask_id="a"), dict(record, mask_id="b")], StudyConfig())


def test_isolated_nodes_are_counted_and_zero_the_algebraic_connectivity():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    measures = graph_measures(mask)
    assert (measures.isolated_outputs, measures.isolated_inputs) == (1, 1)
    assert measures.algebraic_connectivity == pytest.approx(0.0, abs=1e-12) and not measures.connected
