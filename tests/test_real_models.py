"""The models people train, built from configs with random weights (tiny sizes): which clouds are
measured, that each has its layer's shape of neuron, that nothing is left out unexplained, and a
few steps of TopoOptimizer + TopoPenalty + TopologyMonitor on each."""

import math
import warnings

import pytest
import torch
from torch import nn

from topoopt import TopologyMonitor, TopoOptimizer, TopoPenalty, coverage, neuron_cloud, topological_layers
from topoopt.neurons import LayerPart

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0][:, -1])


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x).mean(1))


def _hf(config_name, model_name, **config):
    config = getattr(transformers, config_name)(**config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, model_name)(config)


def _gpt2():
    return _hf("GPT2Config", "GPT2LMHeadModel", n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
               bos_token_id=0, eos_token_id=0)


def _bert():
    return _hf("BertConfig", "BertForSequenceClassification", hidden_size=16, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=32, vocab_size=64, num_labels=2)


def _llama():
    return _hf("LlamaConfig", "LlamaForCausalLM", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=0)


def _tokens():
    return torch.randint(0, 50, (2, 6))


# name → (builder, input maker, loss from output, {layer type: clouds expected})
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10),
                 lambda: torch.randn(2, 3, 32, 32), lambda out: out.logsumexp(1).mean(),
                 {"Conv2d": 20, "Linear": 1}),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10),
                           lambda: torch.randn(2, 3, 32, 32), lambda out: out.logsumexp(1).mean(),
                           {"Conv2d": 52, "Linear": 2}),
    "vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                           depth=2, num_classes=10),
                 lambda: torch.randn(2, 3, 32, 32), lambda out: out.logsumexp(1).mean(),
                 {"Conv2d": 1, "Attention.qkv[q]": 2, "Attention.qkv[k]": 2, "Attention.qkv[v]": 2, "Linear": 7}),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
                      lambda: torch.randn(2, 3, 32, 32), lambda out: out.logsumexp(1).mean(),
                      {"Conv2d": 40, "Linear": 1}),  # conv_mlp: the MLPs are 1×1 convolutions
    "gpt2": (_gpt2, lambda: torch.randint(0, 64, (2, 8)), lambda out: out.logits.logsumexp(-1).mean(),
             {"GPT2Attention.c_attn[q]": 2, "GPT2Attention.c_attn[k]": 2, "GPT2Attention.c_attn[v]": 2,
              "Conv1D": 6, "Linear": 1}),
    "bert": (_bert, lambda: torch.randint(0, 64, (2, 8)), lambda out: out.logits.logsumexp(-1).mean(),
             {"Linear": 14}),
    "llama": (_llama, lambda: torch.randint(0, 64, (2, 8)), lambda out: out.logits.logsumexp(-1).mean(),
              {"Linear": 15}),
    "lstm_classifier": (LSTMClassifier, _tokens, lambda out: out.logsumexp(1).mean(),
                        {**{f"LSTM[{d}.{g}]": 1 for d in ("l0", "l0_reverse") for g in "ifgo"}, "Linear": 1}),
    "transformer_encoder": (Encoder, lambda: torch.randn(2, 5, 16), lambda out: out.logsumexp(1).mean(),
                            {"MultiheadAttention[q]": 2, "MultiheadAttention[k]": 2, "MultiheadAttention[v]": 2,
                             "NonDynamicallyQuantizableLinear": 2, "Linear": 5}),
}


def _expected_shape(layer) -> tuple[int, int]:
    """The neuron cloud's shape from the layer's own sizes (not from its weight's layout)."""
    if isinstance(layer, LayerPart):
        module = layer.module
        if isinstance(module, nn.MultiheadAttention):
            return module.embed_dim, module.embed_dim
        if isinstance(module, nn.LSTM):
            return module.hidden_size, module.input_size + module.hidden_size
        width = layer.spec.rows(module).shape[0]  # a fused QKV's third
        inputs = module.qkv.in_features if hasattr(module, "qkv") else module.c_attn.nx
        return width, inputs
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels, layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    if type(layer).__name__ == "Conv1D":
        return layer.nf, layer.nx
    raise AssertionError(f"no expected shape for {type(layer).__name__}")


@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_is_measured_right_and_trains(name, tmp_path):
    build, make_input, loss_of, expected = MODELS[name]
    torch.manual_seed(0)
    model = build()
    report = coverage(model)
    assert report.unknown_types == [], str(report)
    kinds: dict[str, int] = {}
    for cloud in report.measured.values():
        kinds[cloud.layer_type] = kinds.get(cloud.layer_type, 0) + 1
    assert kinds == expected
    layers = topological_layers(model)
    for layer_name, layer in layers.items():
        assert tuple(neuron_cloud(layer).shape) == _expected_shape(layer), layer_name

    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)  # no coverage warning on these models
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        optimizer = TopoOptimizer(inner, model, every=1, policy="contrast")
        penalty = TopoPenalty(model, weight=1e-3)
        monitor = TopologyMonitor(model, log_dir=str(tmp_path), every=1, diagrams_every=0, optimizer=optimizer)
    with monitor:
        for step in range(2):
            optimizer.zero_grad()
            loss = loss_of(model(make_input())) + penalty()
            loss.backward()
            optimizer.step()
            monitor.step(step)
    assert set(optimizer.scales) == set(layers)
    assert set(monitor.last) == set(layers)
    assert set(penalty.last_values) == {n for n, layer in layers.items() if neuron_cloud(layer).shape[0] >= 2}
    assert all(math.isfinite(v) for v in optimizer.scales.values())


FULL_SIZE = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False),
    "bert_tiny": lambda: _hf("BertConfig", "BertForSequenceClassification", hidden_size=128, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=512, vocab_size=1000),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
@pytest.mark.parametrize("policy", ["calm", "awaken", "contrast", "collapse"])
def test_every_policy_leaves_an_isotropic_initialisation_within_10_percent(name, policy):
    """At the default metric (collapse at its own, mean lifetime), a freshly initialised model's
    layers differ by noise: no policy may turn that into large scales."""
    torch.manual_seed(0)
    model = FULL_SIZE[name]()
    metric = "mean_lifetime" if policy == "collapse" else "normalized_entropy"
    optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, policy=policy, metric=metric)
    scales = optimizer.update_scales()
    assert all(0.9 <= s <= 1.1 for s in scales.values()), {k: v for k, v in scales.items() if abs(v - 1) > 0.1}


def test_a_two_neuron_head_keeps_scale_one_and_stays_out_of_the_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 2))
    optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, policy="calm")
    scales = optimizer.update_scales()
    assert scales["4"] == 1.0 and "4" not in optimizer.complexity
    assert scales["0"] == scales["2"] == 1.0  # no longer braked by the head's entropy of 0
