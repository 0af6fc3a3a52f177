"""Each layer type's neuron cloud against the layer's own computation: an input gradient, an
impulse response, or the layer's forward pass rebuilt from the cloud's rows (never the code's
own reshaping)."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev

import topoopt
from topoopt import TopoOptimizer, TopoPenalty, coverage, neuron_cloud, topological_layers
from topoopt.cloud import layer_cloud
from topoopt.layers import TopologyCoverageWarning, layer_parameters

torch.manual_seed(0)


def clouds_of(model, **options):
    return {name: neuron_cloud(layer).detach() for name, layer in topological_layers(model, **options).items()}


def test_linear_neuron_is_the_input_gradient_of_its_output():
    layer = nn.Linear(5, 4)
    jacobian = jacrev(layer)(torch.randn(5))
    torch.testing.assert_close(neuron_cloud(layer), jacobian)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_neuron_is_the_input_gradient_of_one_output_position(groups):
    layer = nn.Conv2d(4, 6, 3, groups=groups, bias=False)
    jacobian = jacrev(lambda x: layer(x).reshape(6))(torch.randn(4, 3, 3))  # one output position
    cloud = neuron_cloud(layer).detach()
    per_group = 6 // groups
    for j in range(6):
        g = j // per_group
        reads = jacobian[j, g * (4 // groups):(g + 1) * (4 // groups)].reshape(-1)  # its group's inputs
        torch.testing.assert_close(cloud[j], reads)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_neuron_is_its_impulse_response(groups):
    """A 1×1 input: output channel j at kernel position (a, b) is Σ_i x_i · w_ij(a, b), so neuron
    j's incoming weight from input i at (a, b) is the output's gradient there."""
    layer = nn.ConvTranspose2d(6, 8, 3, groups=groups, bias=False)
    jacobian = jacrev(lambda x: layer(x.reshape(1, 6, 1, 1))[0])(torch.randn(6))  # (8, 3, 3, 6)
    cloud = neuron_cloud(layer).detach()
    assert cloud.shape == (8, (6 // groups) * 9)
    per_group, inputs = 8 // groups, 6 // groups
    for j in range(8):
        g = j // per_group
        reads = jacobian[j, :, :, g * inputs:(g + 1) * inputs].permute(2, 0, 1).reshape(-1)
        torch.testing.assert_close(cloud[j], reads)


def test_hf_conv1d_neuron_is_a_column():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(7, 5)  # 5 inputs, 7 outputs; weight (5, 7)
    jacobian = jacrev(layer)(torch.randn(5))
    torch.testing.assert_close(neuron_cloud(layer), jacobian)
    assert list(topological_layers(nn.Sequential(layer))) == ["0"]


def test_bilinear_neuron_is_its_impulse_response():
    layer = nn.Bilinear(3, 4, 5)
    cloud = neuron_cloud(layer).detach()
    for a in range(3):
        for b in range(4):
            response = layer(torch.eye(3)[a:a + 1], torch.eye(4)[b:b + 1])[0] - layer.bias
            torch.testing.assert_close(cloud[:, a * 4 + b], response.detach())


def _attention_by_hand(q_rows, k_rows, v_rows, biases, query, key, value, out_proj):
    q = query @ q_rows.T + biases[0]
    k = key @ k_rows.T + biases[1]
    v = value @ v_rows.T + biases[2]
    weights = torch.softmax(q @ k.T / math.sqrt(q.shape[1]), dim=-1)
    return out_proj(weights @ v)


@pytest.mark.parametrize("separate", [False, True])
def test_attention_q_k_v_clouds_rebuild_the_layer(separate):
    kdim = 3 if separate else None
    mha = nn.MultiheadAttention(6, 1, kdim=kdim, vdim=kdim)
    layers = topological_layers(nn.ModuleDict({"attn": mha}))
    assert list(layers) == ["attn[q]", "attn[k]", "attn[v]", "attn.out_proj"]
    rows = [neuron_cloud(layers[f"attn[{p}]"]).detach() for p in "qkv"]
    biases = [layer_cloud("b", layers[f"attn[{p}]"], include_bias=True)[:, -1] for p in "qkv"]
    query, key = torch.randn(4, 6), torch.randn(5, kdim or 6)
    expected = mha(query, key, key, need_weights=False)[0]
    torch.testing.assert_close(_attention_by_hand(*rows, biases, query, key, key, mha.out_proj), expected)
    whole = topological_layers(nn.ModuleDict({"attn": mha}), fused_qkv="whole")
    assert list(whole) == (["attn[q]", "attn[k]", "attn[v]"] if separate else ["attn[in_proj]"]) + ["attn.out_proj"]


def test_transformer_encoder_layer_measures_q_k_v():
    names = list(topological_layers(nn.TransformerEncoderLayer(8, 2, 16)))
    assert names == ["self_attn[q]", "self_attn[k]", "self_attn[v]", "self_attn.out_proj", "linear1", "linear2"]


def test_gpt2_c_attn_splits_as_the_model_does():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8))
    layers = topological_layers(model)
    assert list(layers) == ["h.0.attn.c_attn[q]", "h.0.attn.c_attn[k]", "h.0.attn.c_attn[v]", "h.0.attn.c_proj",
                            "h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    attention = model.h[0].attn
    x = torch.randn(3, 8)
    query, key, value = attention.c_attn(x).split(attention.split_size, dim=-1)  # GPT2Attention.forward's split
    for part, produced in zip("qkv", (query, key, value)):
        cloud = layer_cloud("x", layers[f"h.0.attn.c_attn[{part}]"], include_bias=True).detach()
        torch.testing.assert_close(x @ cloud[:, :-1].T + cloud[:, -1], produced.detach())
    assert neuron_cloud(layers["h.0.mlp.c_fc"]).shape == (32, 8)  # 4·n_embd neurons of dimension n_embd
    assert list(topological_layers(model, fused_qkv="whole"))[0] == "h.0.attn.c_attn"


def test_timm_fused_qkv_splits_as_the_model_does():
    from timm.layers.attention import Attention

    attention = Attention(8, num_heads=2, qkv_bias=True)
    layers = topological_layers(nn.ModuleDict({"attn": attention}))
    assert list(layers)[:3] == ["attn.qkv[q]", "attn.qkv[k]", "attn.qkv[v]"]
    x = torch.randn(1, 3, 8)
    q, k, v = attention.qkv(x).reshape(1, 3, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)  # timm's forward
    for part, produced in zip("qkv", (q, k, v)):
        cloud = layer_cloud("x", layers[f"attn.qkv[{part}]"], include_bias=True).detach()
        expected = produced.permute(0, 2, 1, 3).reshape(1, 3, 8)
        torch.testing.assert_close(x @ cloud[:, :-1].T + cloud[:, -1], expected.detach())


def test_rnn_gate_is_the_pre_activation_of_one_step():
    rnn = nn.RNN(4, 3)
    x, h0 = torch.randn(1, 1, 4), torch.randn(1, 1, 3)
    out = rnn(x, h0)[0][0, 0]
    layer = topological_layers(rnn)["[l0]"]
    cloud = layer_cloud("x", layer, include_bias=True).detach()
    torch.testing.assert_close(torch.atanh(out), cloud[:, :-1] @ torch.cat([x[0, 0], h0[0, 0]]) + cloud[:, -1])


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_lstm_and_gru_gates_rebuild_one_step_in_both_directions_and_layers(kind):
    proj = {"proj_size": 2} if kind == "LSTM" else {}
    rnn = getattr(nn, kind)(4, 3, num_layers=2, bidirectional=True, **proj)
    layers = topological_layers(rnn)
    gates = "ifgo" if kind == "LSTM" else "rzn"
    expected_names = [f"[{label}.{g}]" for label in ("l0", "l0_reverse", "l1", "l1_reverse")
                      for g in list(gates) + (["proj"] if kind == "LSTM" else [])]
    assert sorted(layers) == sorted(expected_names)
    x = torch.randn(1, 1, 4)
    hidden = 2 if kind == "LSTM" else 3
    h0 = torch.randn(4, 1, hidden)
    c0 = torch.randn(4, 1, 3)
    out, state = rnn(x, (h0, c0)) if kind == "LSTM" else rnn(x, h0)
    inputs = x[0, 0]
    for label, index in (("l0", 0), ("l0_reverse", 1)):
        def gate(g):
            cloud = layer_cloud("x", layers[f"[{label}.{g}]"], include_bias=True).detach()
            weights, bias = (cloud[:, :-2], cloud[:, -2:]) if (kind == "GRU" and g == "n") else (cloud[:, :-1],
                                                                                                  cloud[:, -1])
            return weights, bias
        h = h0[index, 0]
        if kind == "LSTM":
            pre = {g: gate(g)[0] @ torch.cat([inputs, h]) + gate(g)[1] for g in gates}
            c = torch.sigmoid(pre["f"]) * c0[index, 0] + torch.sigmoid(pre["i"]) * torch.tanh(pre["g"])
            h_new = neuron_cloud(layers[f"[{label}.proj]"]).detach() @ (torch.sigmoid(pre["o"]) * torch.tanh(c))
            torch.testing.assert_close(state[1][index, 0], c.detach())
        else:
            r = torch.sigmoid(gate("r")[0] @ torch.cat([inputs, h]) + gate("r")[1])
            z = torch.sigmoid(gate("z")[0] @ torch.cat([inputs, h]) + gate("z")[1])
            w_n, b_n = gate("n")
            n = torch.tanh(w_n[:, :4] @ inputs + b_n[:, 0] + r * (w_n[:, 4:] @ h + b_n[:, 1]))
            h_new = (1 - z) * n + z * h
        torch.testing.assert_close(state[0][index, 0] if kind == "LSTM" else state[index, 0], h_new.detach())


def test_rnn_gates_move_only_their_own_layer_and_directions_parameters():
    lstm = nn.LSTM(4, 3, num_layers=2)
    layers = topological_layers(lstm)
    assert {id(p) for p in layer_parameters(layers["[l1.f]"])} == {
        id(lstm.weight_ih_l1), id(lstm.weight_hh_l1), id(lstm.bias_ih_l1), id(lstm.bias_hh_l1)}


class Mirror(nn.Module):
    """A layer storing its weight as (in, out), unknown to topoopt."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x):
        return x @ self.w


def test_unknown_layer_types_are_warned_about_once_and_nothing_measurable_is_an_error():
    model = nn.Sequential(nn.Linear(3, 5), Mirror(5, 4))
    report = coverage(model)
    assert list(report.measured) == ["0"] and report.unknown_types == ["Mirror"]
    with pytest.warns(TopologyCoverageWarning, match=r"TopoPenalty does not measure .*\['Mirror'\].*1.w"):
        TopoPenalty(model)
    with pytest.raises(ValueError, match="TopoOptimizer: the model has no layer with a neuron cloud .*Mirror"):
        TopoOptimizer(torch.optim.SGD(model[1].parameters(), lr=0.1), nn.Sequential(Mirror(2, 3)))
    with pytest.raises(ValueError, match="layer_topology: the model has no layer"):
        topoopt.layer_topology(nn.Sequential(nn.Embedding(10, 4)))


def test_registered_layer_is_measured_by_its_definition_and_bad_ones_are_refused():
    class Registered(Mirror):
        pass

    topoopt.register_layer(Registered, lambda m: m.w.t(), example=Registered(5, 4))
    model = nn.Sequential(Registered(5, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        penalty = TopoPenalty(model)
    torch.testing.assert_close(neuron_cloud(model[0]), jacrev(model[0])(torch.randn(5)))
    penalty().backward()
    assert model[0].w.grad is not None and model[0].w.grad.abs().sum() > 0

    class Flat(Mirror):
        pass

    with pytest.raises(ValueError, match=r"Layer 'Flat' \(Flat\): its neuron cloud must be a 2-D tensor.*\(20,\)"):
        topoopt.register_layer(Flat, lambda m: m.w.reshape(-1), example=Flat(5, 4))

    class Late(Mirror):
        pass

    topoopt.register_layer(Late, lambda m: m.w.reshape(-1))
    with pytest.raises(ValueError, match=r"Layer 'block.0' \(Late\): its neuron cloud must be a 2-D tensor"):
        topological_layers(nn.ModuleDict({"block": nn.Sequential(Late(5, 4))}))
    with pytest.raises(TypeError, match="rows=.*or parts=.*exactly one"):
        topoopt.register_layer(Late)


def test_vocabulary_sized_layer_is_left_out_with_a_warning_and_can_be_named_or_sampled():
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 30_001))
    with pytest.warns(TopologyCoverageWarning, match=r"'1' \(30001 neurons\).*layers="):
        penalty = TopoPenalty(model)
    assert penalty.layer_names == ["0"]
    assert TopoPenalty(model, layers=["0", "1"]).layer_names == ["0", "1"]
    assert list(topological_layers(model, max_neurons=None)) == ["0", "1"]
    sample = topoopt.sample_neurons(model[1], 120, seed=3)
    assert torch.equal(sample.rows, topoopt.sample_neurons(model[1], 120, seed=3).rows)  # the same subset
    sampled = TopoPenalty(model, layers={"0": model[0], "1~": sample})
    sampled().backward()
    grad_rows = model[1].weight.grad.abs().sum(1) > 0
    assert set(grad_rows.nonzero().flatten().tolist()) <= set(sample.rows.tolist())


def test_a_subsample_lengthens_the_mean_lifetime_as_stated():
    """The stated bias: a subset's tree spans neighbours farther apart, so its mean lifetime is
    longer than the layer's, by roughly (N/k)^(1/d) for a cloud filling d dimensions."""
    layer = nn.Linear(3, 4000, bias=False)
    with torch.no_grad():
        layer.weight.uniform_(-1, 1)
    exact = float(topoopt.mean_lifetime(topoopt.h0_deaths(neuron_cloud(layer).detach())))
    sample = topoopt.sample_neurons(layer, 500, seed=0)
    sampled = float(topoopt.mean_lifetime(topoopt.h0_deaths(neuron_cloud(sample).detach())))
    assert sampled / exact == pytest.approx((4000 / 500) ** (1 / 3), rel=0.15)


def test_parameter_form_with_the_model_reads_layers_by_type():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(nn.ConvTranspose2d(6, 8, 3, groups=2), Conv1D(12, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = TopoOptimizer(model.named_parameters(), model=model, inner=torch.optim.SGD, lr=0.1)
    assert optimizer.layer_names == ["0", "1"]
    shapes = [tuple(neuron_cloud(layer).shape) for layer in optimizer._layers.values()]
    assert shapes == [(8, 27), (12, 5)]
    with pytest.warns(TopologyCoverageWarning, match=r"\['0.weight'\].*wrong for a ConvTranspose"):
        TopoOptimizer(model.named_parameters(), inner=torch.optim.SGD, lr=0.1)
    with pytest.warns(TopologyCoverageWarning, match=r"\['attn.in_proj_weight'\]"):
        TopoOptimizer(nn.ModuleDict({"attn": nn.MultiheadAttention(4, 1)}).named_parameters(),
                      inner=torch.optim.SGD, lr=0.1)


def test_attention_and_lstm_train_under_penalty_and_optimizer():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "lstm": nn.LSTM(8, 6)})
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = TopoOptimizer(inner, model, every=1, policy="contrast")
    penalty = TopoPenalty(model, weight=0.1)
    x = torch.randn(5, 1, 8)
    for _ in range(3):
        optimizer.zero_grad()
        out = model["attn"](x, x, x)[0]
        loss = model["lstm"](out)[0].pow(2).mean() + penalty()
        loss.backward()
        optimizer.step()
    assert set(optimizer.scales) == {"attn[q]", "attn[k]", "attn[v]", "attn.out_proj"} | {
        f"lstm[l0.{g}]" for g in "ifgo"}
    assert model["attn"].in_proj_weight.grad.abs().sum() > 0


def test_timm_fused_qkv_is_split_only_where_its_layout_is_known():
    """EfficientFormer lays its qkv out by head: measured whole, never cut into wrong thirds."""
    import timm

    names = list(topological_layers(timm.create_model("efficientformer_l1", pretrained=False)))
    assert "stages.3.blocks.4.token_mixer.qkv" in names
    assert not any(name.startswith("stages.3.blocks.4.token_mixer.qkv[") for name in names)


def test_eva_separate_q_and_v_biases_are_the_split_clouds_biases():
    from timm.models.eva import EvaAttention

    attention = EvaAttention(8, num_heads=2, qkv_bias=True, scale_norm=False)
    with torch.no_grad():
        attention.q_bias.normal_()
        attention.v_bias.normal_()
    layers = topological_layers(nn.ModuleDict({"attn": attention}))
    biases = [layer_cloud("x", layers[f"attn.qkv[{p}]"], include_bias=True)[:, -1] for p in "qkv"]
    torch.testing.assert_close(torch.cat(biases), torch.cat([attention.q_bias, attention.k_bias, attention.v_bias]))
    assert {id(attention.q_bias), id(attention.v_bias)} <= {id(p) for p in layer_parameters(layers["attn.qkv[q]"])}


class Lora(nn.Module):
    """A LoRA-style layer: its weight lives in three child Linears."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.base_layer = nn.Linear(n_in, n_out)
        self.lora_A = nn.Linear(n_in, 2, bias=False)
        self.lora_B = nn.Linear(2, n_out, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_a_registered_layer_stands_for_its_subtree_and_moves_all_its_parameters():
    topoopt.register_layer(Lora, lambda m: m.base_layer.weight + m.lora_B.weight @ m.lora_A.weight)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Lora(6, 5))
    assert list(coverage(model).measured) == ["0", "2"]  # the children are not measured again
    torch.testing.assert_close(neuron_cloud(model[2]), jacrev(model[2])(torch.randn(6)))
    assert len(layer_parameters(model[2])) == 4
    TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_registrations_and_mappings_that_cannot_work_are_refused_by_name():
    class Detached(Mirror):
        pass

    topoopt.register_layer(Detached, lambda m: m.w.detach())
    with pytest.raises(ValueError, match=r"Layer '0' \(Detached\): its registered cloud has no autograd graph"):
        TopoPenalty(nn.Sequential(Detached(3, 4)))

    class Raising(Mirror):
        pass

    topoopt.register_layer(Raising, lambda m: m.nonexistent)
    with pytest.raises(ValueError, match=r"Layer '0' \(Raising\): its neuron-cloud definition raised AttributeError"):
        coverage(nn.Sequential(Raising(3, 4)))
    with pytest.raises(ValueError, match="parts is empty"):
        topoopt.register_layer(Raising, parts={})
    with pytest.raises(TypeError, match="part names must be strings"):
        topoopt.register_layer(Raising, parts={1: lambda m: m.w})
    with pytest.raises(TypeError, match="example must be a Raising instance"):
        topoopt.register_layer(Raising, lambda m: m.w, example=nn.Linear(2, 2))
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(TypeError, match=r"layers\['a'\]: a ReLU has no neuron cloud"):
        TopoPenalty(model, layers={"a": model[1]})
    with pytest.raises(TypeError, match=r"layers\['attn'\]: a MultiheadAttention has several clouds"):
        TopoPenalty(model, layers={"attn": nn.MultiheadAttention(4, 1)})


def test_known_parameters_that_are_not_clouds_are_not_warned_about():
    report = coverage(nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True)))
    assert report.unknown_types == [] and {p.name for p in report.skipped} == {"0.bias_k", "0.bias_v"}
    whole = coverage(nn.Linear(2, 30_001))
    assert list(whole.oversized) == [""] and all("left out for its size" in p.reason for p in whole.skipped)
    assert "left out for size: <model>" in str(whole)


def test_lstm_projection_has_a_zero_bias_and_samples_are_validated():
    penalty = TopoPenalty(nn.LSTM(4, 3, proj_size=2), include_bias=True)
    assert math.isfinite(float(penalty()))
    with pytest.raises(ValueError, match="Invalid sample size: 10. It must be at most the layer's 5 neurons"):
        topoopt.sample_neurons(nn.Linear(3, 5), 10)
    import numpy as np

    assert topoopt.sample_neurons(nn.Linear(3, 50), np.int64(10)).rows.shape == (10,)


def test_the_coverage_warning_of_layer_topology_points_at_the_callers_line():
    with pytest.warns(TopologyCoverageWarning) as caught:
        topoopt.layer_topology(nn.Sequential(nn.Linear(3, 3), Mirror(3, 3)))
    assert caught[0].filename == __file__
