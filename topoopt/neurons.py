"""What a neuron is, layer type by layer type: the one registry every measurement reads.

A neuron's point is the vector of its incoming weights: the weights that, applied to the layer's
input, give that neuron's pre-activation. Each layer type says where those vectors are:

- ``nn.Linear``, ``nn.Conv1d/2d/3d``: row i of the weight (flattened filter i).
- ``nn.ConvTranspose1d/2d/3d``: the weight is (in, out/groups, *kernel); output channel j of
  group g reads ``weight[g-th block of inputs, j]``.
- Grouped and depthwise convolutions: neuron j is its filter over its own group's channels
  (in/groups · kernel numbers). Two equal depthwise filters read different channels, so they are
  not redundant neurons: on a depthwise layer the cloud measures how varied the filters' shapes
  are, not redundancy, and its lifetimes are not comparable with a full convolution's.
- Hugging Face's ``Conv1D`` (GPT-2): weight (in, out), so neuron j is column j.
- ``nn.Bilinear``: y_k = x1ᵀ A_k x2 + b_k; neuron k is A_k, flattened.
- ``nn.MultiheadAttention``: its query, key and value projections are three clouds (``[q]``,
  ``[k]``, ``[v]``), whether packed in ``in_proj_weight`` or separate; ``out_proj`` is a Linear.
- Fused QKV projections (GPT-2's ``c_attn``, timm's ``qkv``): split in three clouds the same way
  (``fused_qkv="split"``, the default: a query neuron and a value neuron play different roles, so
  one cloud of both mixes two populations), or one cloud (``fused_qkv="whole"``).
- ``nn.RNN/LSTM/GRU`` (and their cells): one cloud per layer, direction and gate (``[l0.i]``,
  ``[l1_reverse.z]``, ...). Unit u's neuron in gate g is its input-to-hidden row and its
  hidden-to-hidden row together: the gate's pre-activation is linear in (x_t, h_{t−1}), and both
  halves are that unit's incoming weights. An LSTM's projection (``proj_size``) is ``[l0.proj]``.

Not neuron clouds: ``nn.Embedding`` (its rows are token vectors, outputs looked up by index,
not a neuron's incoming weights: its "neurons" would be columns of vocabulary length), and the
per-feature vectors of normalisation layers. Users register their own layer types with
`register_layer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CloudSpec", "LayerPart", "register_layer", "cloud_specs", "weight_cloud", "not_a_cloud_reason",
           "plain_weight_rows", "FUSED_QKV_CHOICES"]

FUSED_QKV_CHOICES = ("split", "whole")


@dataclass(frozen=True)
class CloudSpec:
    """One neuron cloud of a module: where its rows and biases are, and which parameters make it.

    ``rows(module)`` gives the N×d cloud with its autograd graph to the weights; ``bias(module)``
    the N biases (or N×k extra coordinates), or None; ``parameters(module)`` the tensors a step
    on this cloud moves; ``child`` a submodule this cloud stands for (its name is not measured
    again on its own).
    """

    rows: Callable[[nn.Module], torch.Tensor]
    bias: Callable[[nn.Module], torch.Tensor | None] = lambda module: None
    parameters: Callable[[nn.Module], list[torch.Tensor]] | None = None
    child: str = ""
    checked: bool = False  # a user's definition: checked for a graph to the parameters when listed


@dataclass(frozen=True, eq=False)
class LayerPart:
    """One of several neuron clouds of a module (a Q, K or V projection, an RNN gate), measured
    as a layer of its own under the name ``<module>[<part>]`` or ``<module>.<child>[<part>]``."""

    module: nn.Module
    part: str
    spec: CloudSpec

    @property
    def kind(self) -> str:
        return type(self.module).__name__


# type → function(module, fused_qkv) → {suffix: CloudSpec}; suffix "" is the whole module.
Definition = Callable[[nn.Module, str], Mapping[str, CloudSpec]]
_BY_TYPE: dict[type, Definition] = {}
_BY_NAME: dict[str, Definition] = {}  # "module.QualName" of types from packages imported lazily
_RESOLVED: dict[type, Definition | None] = {}  # each type's lookup through its bases, cleared on registration


def register_layer(
    layer_type: type[nn.Module] | str,
    rows: Callable[[nn.Module], torch.Tensor] | None = None,
    *,
    parts: Mapping[str, Callable[[nn.Module], torch.Tensor]] | None = None,
    bias: Callable[[nn.Module], torch.Tensor | None] | None = None,
    example: nn.Module | None = None,
) -> None:
    """Tell topoopt what a neuron of `layer_type` is (subclasses included).

    ``rows(module)`` returns the layer's N×d neuron cloud, one row per neuron's incoming weights,
    keeping the graph to the weights (``lambda m: m.weight.T`` for a layer that stores (in, out)).
    Or ``parts={"q": ..., "k": ...}`` for several clouds, measured as ``<layer>[q]`` and so on.
    ``bias(module)`` gives each neuron's bias, appended with ``include_bias=True``. With
    ``example`` (an instance), the definition is checked now: a cloud that is not a 2-D tensor,
    or a bias of the wrong length, is a `ValueError` naming the layer type; otherwise the check
    runs when a model's layers are first listed. A registered layer stands for its whole subtree:
    its children are not measured on their own, and a step on it moves all their parameters.
    """
    if (rows is None) == (parts is None):
        raise TypeError("register_layer takes rows=... (one cloud) or parts={...} (several), exactly one")
    functions = {"": rows} if rows is not None else dict(parts)
    if not functions:
        raise ValueError("register_layer: parts is empty; give at least one part")
    for part, function in functions.items():
        if not isinstance(part, str):
            raise TypeError(f"register_layer: part names must be strings, got {part!r}")
        if not callable(function):
            raise TypeError(f"register_layer: the cloud of part {part!r} must be a callable module -> tensor")
        if part and not all(c.isalnum() or c in "._-" for c in part):
            raise ValueError(f"register_layer: invalid part name {part!r} (letters, digits, '.', '_', '-')")
    if bias is not None and not callable(bias):
        raise TypeError("register_layer: bias must be a callable module -> tensor or None")

    def definition(module: nn.Module, fused_qkv: str) -> dict[str, CloudSpec]:
        # a registered layer stands for its whole subtree (a LoRA layer's base and adapters):
        # its children are not measured again, and a step on it moves all their parameters
        return {(f"[{part}]" if part else ""): CloudSpec(function, bias or (lambda m: None), _all_parameters,
                                                        checked=True)
                for part, function in functions.items()}

    if isinstance(layer_type, str):
        name = layer_type
    elif isinstance(layer_type, type) and issubclass(layer_type, nn.Module):
        name = layer_type.__name__
    else:
        raise TypeError(f"register_layer: layer_type must be an nn.Module subclass, got {layer_type!r}")
    if example is not None:  # checked before it is registered: a bad definition never replaces a good one
        if not isinstance(example, layer_type if isinstance(layer_type, type) else nn.Module):
            raise TypeError(f"register_layer: example must be a {name} instance, got {type(example).__name__}")
        for suffix, spec in definition(example, "split").items():
            check_spec(f"{name}{suffix}", example, spec, include_bias=bias is not None)
    if isinstance(layer_type, str):
        _BY_NAME[layer_type] = definition
    else:
        _BY_TYPE[layer_type] = definition
    _RESOLVED.clear()


def _all_parameters(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters())


def check_spec(name: str, module: nn.Module, spec: CloudSpec, include_bias: bool = False) -> torch.Tensor:
    """The spec's cloud of `module`, or a `ValueError` naming the layer when it is not N×d (or its
    bias does not have one entry per neuron, or a user's definition raises or gives a cloud with
    no autograd graph to the layer's trainable parameters)."""
    try:
        cloud = spec.rows(module)
    except Exception as error:
        raise ValueError(f"Layer {name!r} ({type(module).__name__}): its neuron-cloud definition raised "
                         f"{type(error).__name__}: {error}") from None
    if not isinstance(cloud, torch.Tensor) or cloud.dim() != 2:
        shape = tuple(cloud.shape) if isinstance(cloud, torch.Tensor) else type(cloud).__name__
        raise ValueError(f"Layer {name!r} ({type(module).__name__}): its neuron cloud must be a 2-D tensor "
                         f"(one row per neuron), the registered definition gave {shape}")
    if (spec.checked and torch.is_grad_enabled() and not cloud.requires_grad
            and any(p.requires_grad for p in module.parameters())):
        raise ValueError(f"Layer {name!r} ({type(module).__name__}): its registered cloud has no autograd graph "
                         f"to the layer's parameters (detached, or built from new tensors): a penalty could not "
                         f"reach them")
    if include_bias:
        bias = spec.bias(module)
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape[:1] != cloud.shape[:1]):
            raise ValueError(f"Layer {name!r} ({type(module).__name__}): {cloud.shape[0]} neurons but a bias "
                             f"of shape {tuple(getattr(bias, 'shape', ()))}")
    return cloud


def cloud_specs(module: nn.Module, fused_qkv: str = "split") -> Mapping[str, CloudSpec] | None:
    """The clouds of `module` by name suffix (``""``: the module itself), or None when its type
    has no registered definition (its own or a base class's)."""
    definition = _definition_of(type(module))
    if definition is not None:
        return definition(module, fused_qkv)
    for rule in _STRUCTURAL:
        found = rule(module, fused_qkv)
        if found is not None:
            return found
    return None


def _definition_of(kind: type) -> Definition | None:
    """The registered definition of a type, its own or its nearest base class's, looked up once a
    type (every measurement asks for every layer's clouds)."""
    if kind not in _RESOLVED:
        found = None
        for base in kind.__mro__:
            found = _BY_TYPE.get(base) or _BY_NAME.get(f"{base.__module__}.{base.__qualname__}")
            if found is not None or base is nn.Module:
                break
        _RESOLVED[kind] = found
    return _RESOLVED[kind]


def weight_cloud(weight: torch.Tensor, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """The N×d cloud of a weight tensor of 2 or more dimensions, one row per output neuron.

    A Linear or Conv weight is (out, in/groups, *kernel): row i is output unit i's weight,
    flattened. A transposed convolution stores (in, out/groups, *kernel); its output channel j of
    group g reads the slice ``weight[g-th block of inputs, j]``, which becomes one row.
    """
    if weight.dim() < 2:
        raise ValueError(f"A neuron cloud needs a weight of 2 or more dimensions, got shape {tuple(weight.shape)}")
    if not transposed:
        if weight.dim() == 2:
            return weight  # already N×d: no view, so no extra autograd node in a penalty's backward
        return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))
    in_channels, out_per_group, *kernel = weight.shape
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *kernel).transpose(1, 2)
    row_length = (in_channels // groups) * math.prod(kernel)
    return grouped.reshape(groups * out_per_group, row_length)


# ---- the built-in definitions ----

def _weight_rows(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if type(weight) is not nn.Parameter and isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"This {type(module).__name__} is not initialised yet: run one forward pass first")
    # Masked layers (topoopt.sparse.SparseLinear) expose the weight they really use, so that a
    # topological gradient never reaches a pruned connection. (Looked up only where it may be:
    # a module's failed attribute lookup builds an error message, ~5 µs a layer and call.)
    if _may_have(module, "effective_weight"):
        weight = getattr(module, "effective_weight", weight)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    return weight_cloud(weight, transposed=transposed, groups=getattr(module, "groups", 1))


def _may_have(module: nn.Module, name: str) -> bool:
    """Whether `getattr(module, name)` can succeed: the class, the instance or one of the
    module's parameter, buffer or submodule tables has the name, or the class answers unknown
    names itself (its own ``__getattr__``)."""
    kind = type(module)
    return (hasattr(kind, name) or name in module.__dict__ or name in module._parameters
            or name in module._buffers or name in module._modules or kind.__getattr__ is not nn.Module.__getattr__)


def _own_bias(module: nn.Module) -> torch.Tensor | None:
    return module.bias


WEIGHT_LAYER = CloudSpec(_weight_rows, _own_bias)


def _weight_layer(module: nn.Module, fused_qkv: str) -> dict[str, CloudSpec]:
    return {"": WEIGHT_LAYER}


for _kind in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
              nn.ConvTranspose3d):
    _BY_TYPE[_kind] = _weight_layer


_PLAIN_WEIGHT_TYPES = frozenset({nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d})


def plain_weight_rows(module: object) -> torch.Tensor | None:
    """The cloud of a built-in Linear or Conv layer read straight from its weight parameter, or
    None for any other layer (a subclass, a mask, a parametrization, an uninitialised or sharded
    weight, a definition registered over the built-in one): where this gives a tensor, it is the
    one `neuron_cloud` gives. A measuring step looks up every layer's cloud; this is that look-up
    without the registry's walk."""
    kind = type(module)
    if kind not in _PLAIN_WEIGHT_TYPES or _definition_of(kind) is not _weight_layer \
            or _may_have(module, "effective_weight"):
        return None
    weight = module._parameters.get("weight")  # (what `module.weight` finds, without Module.__getattr__)
    return weight_cloud(weight) if type(weight) is nn.Parameter else None


def _bilinear(module: nn.Module, fused_qkv: str) -> dict[str, CloudSpec]:
    return {"": CloudSpec(lambda m: m.weight.reshape(m.weight.shape[0], -1), _own_bias)}


_BY_TYPE[nn.Bilinear] = _bilinear


def _columns(module: nn.Module, fused_qkv: str) -> dict[str, CloudSpec]:
    return {"": CloudSpec(lambda m: m.weight.t(), _own_bias)}


_BY_NAME["transformers.pytorch_utils.Conv1D"] = _columns


def _blocks(rows: Callable[[nn.Module], torch.Tensor], bias: Callable[[nn.Module], torch.Tensor | None],
            names: list[str], sizes: list[int], child: str = "", parameters=None) -> dict[str, CloudSpec]:
    """Consecutive row blocks of one cloud, one spec each (suffix ``<child>[<name>]``)."""
    specs, start = {}, 0
    prefix = f".{child}" if child else ""
    for name, size in zip(names, sizes):
        lo, hi = start, start + size
        specs[f"{prefix}[{name}]"] = CloudSpec(
            lambda m, lo=lo, hi=hi: rows(m)[lo:hi],
            lambda m, lo=lo, hi=hi: None if (b := bias(m)) is None else b[lo:hi],
            parameters, child)
        start = hi
    return specs


def _attention(module: nn.MultiheadAttention, fused_qkv: str) -> dict[str, CloudSpec]:
    own = lambda m: [p for p in (m.in_proj_weight, m.in_proj_bias, m.q_proj_weight,  # noqa: E731
                                 m.k_proj_weight, m.v_proj_weight) if p is not None]
    e = module.embed_dim
    if module.in_proj_weight is not None:
        if fused_qkv == "whole":
            return {"[in_proj]": CloudSpec(lambda m: m.in_proj_weight, lambda m: m.in_proj_bias, own)}
        return _blocks(lambda m: m.in_proj_weight, lambda m: m.in_proj_bias, ["q", "k", "v"], [e, e, e],
                       parameters=own)
    specs = {}
    for index, name in enumerate("qkv"):
        specs[f"[{name}]"] = CloudSpec(
            lambda m, name=name: getattr(m, f"{name}_proj_weight"),
            lambda m, index=index: None if m.in_proj_bias is None else m.in_proj_bias[index * e:(index + 1) * e],
            own)
    return specs


_BY_TYPE[nn.MultiheadAttention] = _attention


def _child_params(child: str) -> Callable[[nn.Module], list[torch.Tensor]]:
    return lambda m: list(getattr(m, child).parameters())


def _gpt2_attention(module: nn.Module, fused_qkv: str) -> dict[str, CloudSpec] | None:
    if fused_qkv == "whole":
        return None  # c_attn is then a Conv1D like any other
    attn = module.c_attn
    rows = lambda m: m.c_attn.weight.t()  # noqa: E731
    bias = lambda m: m.c_attn.bias  # noqa: E731
    if getattr(module, "is_cross_attention", False):  # queries from q_attn; c_attn holds K and V
        e = attn.weight.shape[1] // 2
        return _blocks(rows, bias, ["k", "v"], [e, e], "c_attn", _child_params("c_attn"))
    e = attn.weight.shape[1] // 3
    return _blocks(rows, bias, ["q", "k", "v"], [e, e, e], "c_attn", _child_params("c_attn"))


_BY_NAME["transformers.models.gpt2.modeling_gpt2.GPT2Attention"] = _gpt2_attention


# timm's attention classes whose fused ``qkv`` output is reshaped as (3, heads, head_dim): rows in
# three consecutive blocks, Q then K then V (checked against each class's forward). Others lay it
# out by head (EfficientFormer, TinyViT, MaxxViT with head_first): their ``qkv`` stays one cloud.
_TIMM_CONSECUTIVE_QKV = {"timm.layers.attention.Attention", "timm.models.vision_transformer.Attention",
                         "timm.models.eva.EvaAttention", "timm.models.beit.Attention",
                         "timm.models.swin_transformer.WindowAttention", "timm.models.maxxvit.AttentionCl"}


def _qkv_bias(m: nn.Module) -> torch.Tensor | None:
    """A fused QKV's bias: the Linear's, or EVA's and BEiT's separate q_bias, k_bias, v_bias."""
    if getattr(m, "q_bias", None) is not None:
        k_bias = getattr(m, "k_bias", None)
        return torch.cat([m.q_bias, torch.zeros_like(m.q_bias) if k_bias is None else k_bias, m.v_bias])
    return m.qkv.bias


def _timm_fused_qkv(module: nn.Module, fused_qkv: str) -> dict[str, CloudSpec] | None:
    kind = type(module)
    if fused_qkv == "whole" or f"{kind.__module__}.{kind.__qualname__}" not in _TIMM_CONSECUTIVE_QKV:
        return None
    qkv = module._modules.get("qkv")
    if not isinstance(qkv, nn.Linear) or qkv.out_features % 3 or getattr(module, "head_first", False):
        return None
    e = qkv.out_features // 3

    def parameters(m: nn.Module) -> list[torch.Tensor]:
        extra = [p for p in (getattr(m, "q_bias", None), getattr(m, "v_bias", None)) if isinstance(p, nn.Parameter)]
        return list(m.qkv.parameters()) + extra

    return _blocks(lambda m: m.qkv.weight, _qkv_bias, ["q", "k", "v"], [e, e, e], "qkv", parameters)


_STRUCTURAL: list[Callable[[nn.Module, str], Mapping[str, CloudSpec] | None]] = [_timm_fused_qkv]

_GATES = {"RNN": [""], "RNN_TANH": [""], "RNN_RELU": [""], "LSTM": ["i", "f", "g", "o"], "GRU": ["r", "z", "n"]}


def _gate_spec(suffix: str, gate: int, hidden: int, gru_new: bool) -> CloudSpec:
    """Gate `gate` of one layer and direction: unit u's row of W_ih and of W_hh, side by side."""
    lo, hi = gate * hidden, (gate + 1) * hidden

    def rows(m: nn.Module) -> torch.Tensor:
        return torch.cat([getattr(m, f"weight_ih{suffix}")[lo:hi], getattr(m, f"weight_hh{suffix}")[lo:hi]], dim=1)

    def bias(m: nn.Module) -> torch.Tensor | None:
        b_ih, b_hh = getattr(m, f"bias_ih{suffix}", None), getattr(m, f"bias_hh{suffix}", None)
        if b_ih is None:
            return None
        if gru_new:  # a GRU's candidate: r ⊙ (W_hn h + b_hn), so b_hn is not added to b_in
            return torch.stack([b_ih[lo:hi], b_hh[lo:hi]], dim=1)
        return b_ih[lo:hi] + b_hh[lo:hi]

    def parameters(m: nn.Module) -> list[torch.Tensor]:  # this layer and direction's, not the others'
        found = (getattr(m, f"{kind}{suffix}", None) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        return [p for p in found if p is not None]

    return CloudSpec(rows, bias, parameters)


def _recurrent(module: nn.Module, fused_qkv: str) -> dict[str, CloudSpec]:
    if isinstance(module, nn.RNNBase):
        mode, layers, directions = module.mode, module.num_layers, 2 if module.bidirectional else 1
        suffixes = [f"_l{layer}{'_reverse' if direction else ''}"
                    for layer in range(layers) for direction in range(directions)]
    else:  # a cell
        mode = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}.get(type(module), "RNN")
        suffixes = [""]
    gates = _GATES[mode]
    specs = {}
    for suffix in suffixes:
        label = suffix.removeprefix("_") or "cell"
        for index, gate in enumerate(gates):
            name = f"{label}.{gate}" if gate else label
            specs[f"[{name}]"] = _gate_spec(suffix, index, module.hidden_size, mode == "GRU" and gate == "n")
        if getattr(module, "proj_size", 0):
            specs[f"[{label}.proj]"] = CloudSpec(  # a projection has no bias: its neurons' bias is 0
                lambda m, s=suffix: getattr(m, f"weight_hr{s}"),
                lambda m, s=suffix: getattr(m, f"weight_hr{s}").new_zeros(getattr(m, f"weight_hr{s}").shape[0]),
                lambda m, s=suffix: [getattr(m, f"weight_hr{s}")])
    return specs


for _kind in (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell):
    _BY_TYPE[_kind] = _recurrent

_NOT_A_CLOUD: dict[type, str] = {
    nn.Embedding: "an embedding's rows are token vectors looked up by index, not neurons' incoming weights",
    nn.EmbeddingBag: "an embedding's rows are token vectors looked up by index, not neurons' incoming weights",
    nn.modules.batchnorm._NormBase: "a normalisation layer's per-feature scale and shift (one number per feature)",
    nn.LayerNorm: "a normalisation layer's per-feature scale and shift (one number per feature)",
    nn.GroupNorm: "a normalisation layer's per-feature scale and shift (one number per feature)",
    nn.PReLU: "an activation's slope (one number per feature)",
}
if hasattr(nn, "RMSNorm"):
    _NOT_A_CLOUD[nn.RMSNorm] = _NOT_A_CLOUD[nn.LayerNorm]


def not_a_cloud_reason(module: nn.Module, name: str, parameter: torch.Tensor) -> str | None:
    """Why parameter `name` of `module`, which no cloud uses, is left out by design, or None
    when the package does not know this layer type (the case it warns about)."""
    lowered = name.lower()
    if "relative_position" in lowered or "rel_pos" in lowered or "relative_attention_bias" in lowered:
        return "a relative-position bias table of an attention layer, not neurons' incoming weights"
    if isinstance(module, nn.MultiheadAttention) and name in ("bias_k", "bias_v"):
        return "attention's learned key/value bias token (add_bias_kv), not neurons' incoming weights"
    for kind, reason in _NOT_A_CLOUD.items():
        if isinstance(module, kind):
            return reason
    kind = type(module).__name__
    if "Norm" in kind or "Embedding" in kind:
        return f"a {kind} (by its name a normalisation or embedding layer): no neuron cloud"
    if parameter.dim() < 2:
        return "a vector (one number per feature): no neuron cloud"
    if any(word in name.lower() for word in ("token", "embed", "pos_")):
        return "by its name a learned token or position embedding, not neurons' incoming weights"
    return None
