"""Study: merging neurons along the H0 tree, with and without `MergePenalty`, against L1 pruning,
cosine Neuron Merging (Kim et al. 2020) and torch-pruning's magnitude pruner at matched sizes. The
pre-registrations (hypotheses, the family, what the design cannot detect) are in
experiments/RESULTS.md ("Merging neurons along the H0 tree against structured pruning" and its
follow-up on the CNN).

An MLP 784-128-128-10 on mnist5k, or a CNN (conv 16 and conv 32 filters of 3×3, each with ReLU and
2×2 max pooling, then a linear layer) on 4,000 Fashion-MNIST images; trained plain and with
`MergePenalty(keep=0.5)`; each network compressed by each method to remove 25, 50 and 75% of each
hidden layer's neurons (filters), evaluated as is and after one epoch of fine-tuning. One record
per seed (resumable: finished seeds are read back).

    topoopt merging --quick                  # 2 seeds, 2 epochs: seconds (the CNN: a minute)
    topoopt merging                          # the pre-registered MLP study
    topoopt merging --model cnn --methods l1 cosine h0 tp --out experiments/results/merging/cnn
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from topoopt._validation import invalid
from topoopt.lab.models import build_mlp
from topoopt.lab.studies.failure_suite import suite_data
from topoopt.lab.studies.options import command_parser, positive_int
from topoopt.lab.studies.statistics import holm
from topoopt.merging import MergePenalty, merge_neurons

RESULTS = Path("experiments/results/merging")
WIDTHS = [784, 128, 128, 10]
REMOVALS = (0.25, 0.5, 0.75)
METHODS = ("l1", "cosine", "h0")
ALL_METHODS = (*METHODS, "tp")
METHOD_NAMES = {"l1": "L1 pruning", "cosine": "cosine merge", "h0": "H0 merge", "tp": "torch-pruning (L2)"}
PILOT_SEEDS = (100, 101)
PILOT_WEIGHTS = (1e-3, 1e-2, 1e-1)
# Each model's hidden layers and the layer that reads each.
HIDDEN = {"mlp": {"fc1": "fc2", "fc2": "fc3"}, "cnn": {"conv1": "conv2", "conv2": "fc"}}
DATA = {"mlp": "mnist5k", "cnn": "fashion5k"}


def build(model: str) -> nn.Sequential:
    if model == "mlp":
        return build_mlp(WIDTHS)
    if model == "cnn":
        return nn.Sequential(OrderedDict([
            ("image", nn.Unflatten(1, (1, 28, 28))),
            ("conv1", nn.Conv2d(1, 16, 3)), ("act1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(16, 32, 3)), ("act2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()), ("fc", nn.Linear(32 * 5 * 5, 10))]))
    raise invalid("model", model, "'mlp' or 'cnn'")


def train(model: nn.Module, data, epochs: int, seed: int, penalty: MergePenalty | None = None) -> None:
    """Adam lr 1e-3, batch 128, the batch order drawn from `seed`."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), 128):
            batch = order[start:start + 128]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def _keep(layer: nn.Module, removal: float) -> int:
    return max(1, round((1 - removal) * layer.weight.shape[0]))


@torch.no_grad()
def prune(model: nn.Sequential, removal: float, compensate: bool, hidden: dict[str, str]) -> nn.Sequential:
    """Remove the hidden neurons (filters) of smallest L1 incoming norm; with `compensate`, each
    removed neuron's outgoing weights go, times its norm ratio, to the kept neuron most
    cosine-similar to it (Kim et al. 2020's Neuron Merging, data-free). A neuron's outgoing weights
    are the next layer's input channel, or, after a flatten, its block of the Linear's inputs."""
    pruned = copy.deepcopy(model)
    for name, following in hidden.items():
        layer, after = getattr(pruned, name), getattr(pruned, following)
        n = layer.weight.shape[0]
        incoming = torch.cat([layer.weight.reshape(n, -1), layer.bias[:, None]], dim=1)
        kept = incoming.abs().sum(1).argsort(descending=True)[:_keep(layer, removal)].sort().values
        removed = torch.tensor([i for i in range(n) if i not in set(kept.tolist())], dtype=torch.long)
        shape = after.weight.shape
        outgoing = after.weight.reshape(shape[0], n, -1).clone()  # (out, neuron, its inputs there)
        if compensate and len(removed):
            norms = incoming.norm(dim=1).clamp_min(1e-12)
            unit = incoming / norms[:, None]
            best = (unit[removed] @ unit[kept].T).argmax(1)
            for j, target in zip(removed.tolist(), kept[best].tolist()):
                outgoing[:, target] += (norms[j] / norms[target]) * outgoing[:, j]
        layer.weight = nn.Parameter(layer.weight[kept].clone())
        layer.bias = nn.Parameter(layer.bias[kept].clone())
        kept_out = outgoing[:, kept].reshape(shape[0], -1, *shape[2:]) if len(shape) > 2 else \
            outgoing[:, kept].reshape(shape[0], -1)
        after.weight = nn.Parameter(kept_out.clone())
        if isinstance(layer, nn.Linear):
            layer.out_features = len(kept)
        else:
            layer.out_channels = len(kept)
        if isinstance(after, nn.Linear):
            after.in_features = after.weight.shape[1]
        else:
            after.in_channels = len(kept)
    return pruned


def torch_pruning_magnitude(model: nn.Sequential, removal: float, hidden: dict[str, str]) -> nn.Sequential:
    """torch-pruning's `MagnitudePruner` (DepGraph) with its L2 group importance: each hidden
    neuron scored by the norm of every weight its removal deletes (incoming and outgoing), the same
    fraction removed from each hidden layer, the output layer left whole."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    hidden_layers = [getattr(pruned, name) for name in hidden]
    ignored = [m for m in pruned.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and
               not any(m is h for h in hidden_layers)]
    targets = {name: _keep(layer, removal) for name, layer in zip(hidden, hidden_layers)}
    ratios = {layer: 1 - targets[name] / layer.weight.shape[0] for name, layer in zip(hidden, hidden_layers)}
    pruner = tp.pruner.MagnitudePruner(pruned, torch.zeros(1, 784), importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio_dict=ratios, ignored_layers=ignored)
    pruner.step()
    widths = {name: getattr(pruned, name).weight.shape[0] for name in hidden}
    if widths != targets:  # matched sizes are the study's premise
        raise RuntimeError(f"torch-pruning kept {widths} neurons, not the {targets} asked")
    return pruned


def compress(model: nn.Sequential, method: str, removal: float, hidden: dict[str, str]) -> nn.Sequential:
    if method == "h0":
        return merge_neurons(model, {name: _keep(getattr(model, name), removal) for name in hidden})[0]
    if method == "tp":
        return torch_pruning_magnitude(model, removal, hidden)
    return prune(model, removal, compensate=method == "cosine", hidden=hidden)


def _trained(model_name: str, seed: int, epochs: int, data, weight: float | None) -> nn.Sequential:
    """The network of `seed`, trained plain (`weight` None) or with `MergePenalty(keep=0.5)`."""
    torch.manual_seed(seed)
    model = build(model_name)
    penalty = (MergePenalty(model, keep=0.5, weight=weight, layers=list(HIDDEN[model_name]))
               if weight is not None else None)
    train(model, data, epochs, seed, penalty)
    return model


def run_seed(seed: int, epochs: int, weight: float, data, model_name: str = "mlp",
             methods: tuple[str, ...] = METHODS) -> dict:
    """Both trainings of one seed and every compression of each, as and after fine-tuning."""
    started = time.perf_counter()
    networks = {"plain": _trained(model_name, seed, epochs, data, None),
                "penalty": _trained(model_name, seed, epochs, data, weight)}
    record = {"seed": seed, "model": model_name, "epochs": epochs, "weight": weight,
              "unmerged": {network: accuracy(model, data) for network, model in networks.items()}, "results": []}
    for (network, model), method, removal in itertools.product(networks.items(), methods, REMOVALS):
        small = compress(model, method, removal, HIDDEN[model_name])
        as_is = accuracy(small, data)
        train(small, data, 1, 1000 + seed)  # one epoch of fine-tuning, the same order for every method
        record["results"].append({"network": network, "method": method, "removal": removal,
                                  "accuracy": as_is, "fine_tuned": accuracy(small, data),
                                  "parameters": sum(p.numel() for p in small.parameters())})
    record["seconds"] = time.perf_counter() - started
    return record


def choose_weight(epochs: int, data, folder: Path, model_name: str = "mlp") -> float:
    """The largest pilot weight whose penalised network is within 1 point of plain (pilot seeds)."""
    path = folder / "pilot.json"
    if path.exists():
        pilot = json.loads(path.read_text())
        if pilot.get("model", "mlp") != model_name:
            raise ValueError(f"{path} is the {pilot.get('model', 'mlp')}'s pilot, not the {model_name}'s: "
                             f"pass another --out")
        return pilot["chosen"]
    rows, runs = {}, []
    for weight in PILOT_WEIGHTS:
        gaps = []
        for seed in PILOT_SEEDS:
            accuracies = {network: accuracy(_trained(model_name, seed, epochs, data, w), data)
                          for network, w in (("plain", None), ("penalty", weight))}
            gaps.append(accuracies["plain"] - accuracies["penalty"])
            runs.append({"weight": weight, "seed": seed, **accuracies})
        rows[str(weight)] = float(np.mean(gaps))
    allowed = [w for w in PILOT_WEIGHTS if rows[str(w)] <= 0.01]
    chosen = max(allowed) if allowed else min(PILOT_WEIGHTS)
    path.write_text(json.dumps({"model": model_name, "seeds": list(PILOT_SEEDS), "runs": runs,
                                "mean_accuracy_loss": rows, "chosen": chosen}, indent=2))
    return chosen


def signed_rank_greater(differences: list[float]) -> float:
    """Exact one-sided Wilcoxon signed-rank p-value for median difference > 0 (zeros dropped,
    ties by average ranks), by enumerating every sign pattern."""
    from scipy.stats import rankdata

    d = np.array([x for x in differences if x != 0.0])
    if len(d) == 0:
        return 1.0
    ranks = rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    count = sum(1 for signs in itertools.product((0, 1), repeat=len(d))
                if (ranks * np.array(signs)).sum() >= observed - 1e-9)
    return count / 2 ** len(d)


def signed_rank_two_sided(differences: list[float]) -> float:
    d = [x for x in differences if x != 0.0]
    return min(1.0, 2 * min(signed_rank_greater(d), signed_rank_greater([-x for x in d]))) if d else 1.0


def summarise(records: list[dict]) -> dict:
    """Medians per network × method × removal, the three pre-registered tests and the goal count."""
    methods = tuple(dict.fromkeys(r["method"] for r in records[0]["results"])) if records else METHODS

    def values(network, method, removal, key="accuracy"):
        return [next(r[key] for r in rec["results"] if (r["network"], r["method"], r["removal"]) ==
                     (network, method, removal)) for rec in records]

    table = {f"{network}/{method}/{removal:g}": {
        "accuracy": float(np.median(values(network, method, removal))),
        "fine_tuned": float(np.median(values(network, method, removal, "fine_tuned")))}
        for network, method, removal in itertools.product(("plain", "penalty"), methods, REMOVALS)}
    tests, goal = {}, {}
    for removal in (0.5, 0.75):
        ours = values("penalty", "h0", removal)
        others = {f"{n}/{m}": values(n, m, removal) for n, m in itertools.product(("plain", "penalty"), methods)
                  if (n, m) != ("penalty", "h0")}
        best = max(others, key=lambda k: np.median(others[k]))
        differences = [a - b for a, b in zip(ours, others[best])]
        tests[f"H{1 if removal == 0.5 else 2}"] = {"removal": removal, "best_other": best,
                                                    "median_difference": float(np.median(differences)),
                                                    "p": signed_rank_greater(differences)}
        goal[str(removal)] = sum(all(ours[i] > v[i] for v in others.values()) for i in range(len(records)))
    unmerged = [rec["unmerged"]["penalty"] - rec["unmerged"]["plain"] for rec in records]
    tests["H3"] = {"median_difference": float(np.median(unmerged)), "p": signed_rank_two_sided(unmerged)}
    for key, adjusted in zip(tests, holm([t["p"] for t in tests.values()])):
        tests[key]["holm_p"] = adjusted
    return {"seeds": [rec["seed"] for rec in records], "weight": records[0]["weight"] if records else None,
            "model": records[0].get("model", "mlp") if records else None, "methods": list(methods),
            "unmerged": {n: float(np.median([rec["unmerged"][n] for rec in records])) for n in ("plain", "penalty")},
            "table": table, "tests": tests, "seeds_beating_every_other": goal}


def plot_curves(summary: dict, path: Path) -> None:
    """Median test accuracy against the fraction of hidden neurons removed: one line per network ×
    method, as is (left) and after one epoch of fine-tuning (right)."""
    from topoopt.plotting import new_figure, save_png

    figure = new_figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    colours = {"l1": "tab:grey", "cosine": "tab:blue", "h0": "tab:red", "tp": "tab:green"}
    for ax, key, title in zip(axes, ("accuracy", "fine_tuned"), ("as is", "after one epoch of fine-tuning")):
        for network, method in itertools.product(("plain", "penalty"), summary.get("methods", METHODS)):
            values = [summary["unmerged"][network]] + [summary["table"][f"{network}/{method}/{r:g}"][key]
                                                       for r in REMOVALS]
            name = METHOD_NAMES[method]
            ax.plot([0, *REMOVALS], values, marker="o", color=colours[method],
                    linestyle="-" if network == "penalty" else "--", label=f"{network}, {name}")
        ax.set(title=title, xlabel="fraction of hidden neurons removed", xticks=[0, *REMOVALS])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"median test accuracy ({len(summary['seeds'])} seeds)")
    axes[1].legend(loc="lower left", fontsize=8)
    save_png(figure, path)


def report(summary: dict) -> str:
    lines = [f"MergePenalty weight {summary['weight']:g}; unmerged median accuracy: plain "
             f"{summary['unmerged']['plain']:.4f}, penalty {summary['unmerged']['penalty']:.4f}",
             "| network | method | " + " | ".join(f"{r:.0%} removed (as is / fine-tuned)" for r in REMOVALS) + " |",
             "|---|---|" + "---:|" * len(REMOVALS)]
    for network, method in itertools.product(("plain", "penalty"), summary.get("methods", METHODS)):
        cells = [summary["table"][f"{network}/{method}/{r:g}"] for r in REMOVALS]
        lines.append(f"| {network} | {method} | " + " | ".join(f"{c['accuracy']:.4f} / {c['fine_tuned']:.4f}"
                                                                for c in cells) + " |")
    seeds = len(summary["seeds"])
    for key, test in summary["tests"].items():
        against = f" against {test['best_other']}" if "best_other" in test else ""
        line = f"{key}{against}: median difference {test['median_difference']:+.4f}"
        if seeds >= 6:
            line += f", p {test['p']:.3g} (Holm {test['holm_p']:.3g})"
        lines.append(line)
    counts = ", ".join(f"{float(r):.0%} removed {n}/{seeds}" for r, n in summary["seeds_beating_every_other"].items())
    lines.append(f"seeds where penalty + H0 merge beats every other combination (no fine-tuning): {counts}")
    if seeds < 6:
        lines.append(f"verdict: {seeds} seed(s) cannot tell; run the pre-registered study (10 seeds)")
    else:
        held = [k for k in ("H1", "H2") if summary["tests"][k]["holm_p"] < 0.05]
        where = ", ".join(f"{summary['tests'][k]['removal']:.0%}" for k in held) if held else "no removal fraction"
        lines.append(f"verdict: penalty + H0 merge beats the best other combination at {where} (Holm p < 0.05)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser("merging", __doc__)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs, the pilot skipped (weight 1e-2)")
    parser.add_argument("--seeds", type=positive_int, default=10)
    parser.add_argument("--epochs", type=positive_int, default=8)
    parser.add_argument("--model", choices=list(HIDDEN), default="mlp",
                        help="mlp: 784-128-128-10 on mnist5k; cnn: two conv layers on 4,000 Fashion-MNIST images")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS),
                        help="compression methods (tp: torch-pruning's magnitude pruner, needs torch-pruning)")
    parser.add_argument("--out", default=None,
                        help=f"results folder (default {RESULTS} for the MLP, {RESULTS / 'cnn'} for the CNN; "
                             f"their quick/ folder with --quick)")
    args = parser.parse_args(argv)
    seeds, epochs = (2, 2) if args.quick else (args.seeds, args.epochs)
    default = RESULTS if args.model == "mlp" else RESULTS / args.model
    folder = Path(args.out) if args.out else default / "quick" if args.quick else default
    folder.mkdir(parents=True, exist_ok=True)
    methods = tuple(dict.fromkeys(args.methods))
    torch.set_num_threads(1)
    data = suite_data(DATA[args.model])
    weight = 1e-2 if args.quick else choose_weight(epochs, data, folder, args.model)
    records = []
    for seed in range(seeds):
        path = folder / f"seed{seed}.json"
        if path.exists():
            record = json.loads(path.read_text())
            held = (record.get("model", "mlp"), tuple(dict.fromkeys(r["method"] for r in record["results"])),
                    record.get("epochs"))
            if held != (args.model, methods, epochs):
                parser.error(f"{path} holds the {held[0]} with methods {', '.join(held[1])} trained {held[2]} epochs, "
                             f"not the {args.model} with {', '.join(methods)} for {epochs}: pass another --out")
            records.append(record)
            continue
        record = run_seed(seed, epochs, weight, data, args.model, methods)
        path.write_text(json.dumps(record, indent=1))
        records.append(record)
        print(f"seed {seed}: {record['seconds']:.0f} s", flush=True)
    summary = summarise(records)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    text = report(summary)
    (folder / "table.md").write_text(text + "\n")
    plot_curves(summary, folder / "curves.png")
    print(text)
    print(f"results in {folder}")
    return summary


if __name__ == "__main__":
    main()
