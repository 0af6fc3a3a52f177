"""Study: merging neurons along the H0 tree, with and without `MergePenalty`, against L1 pruning and
cosine Neuron Merging (Kim et al. 2020) at matched sizes. The pre-registration (hypotheses, the
family, what the design cannot detect) is in experiments/RESULTS.md ("Merging neurons along the H0
tree against structured pruning").

An MLP 784-128-128-10 on mnist5k, trained plain and with `MergePenalty(keep=0.5)`; each network
compressed by each method to remove 25, 50 and 75% of each hidden layer's neurons, evaluated as is
and after one epoch of fine-tuning. One record per seed (resumable: finished seeds are read back).

    topoopt merging --quick      # 2 seeds, 2 epochs, a minute
    topoopt merging              # the pre-registered study
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from topoopt.lab.data import load_dataset
from topoopt.lab.models import build_mlp
from topoopt.lab.studies.options import command_parser, positive_int
from topoopt.lab.studies.statistics import holm
from topoopt.merging import MergePenalty, merge_neurons

RESULTS = Path("experiments/results/merging")
WIDTHS = [784, 128, 128, 10]
REMOVALS = (0.25, 0.5, 0.75)
METHODS = ("l1", "cosine", "h0")
PILOT_SEEDS = (100, 101)
PILOT_WEIGHTS = (1e-3, 1e-2, 1e-1)
HIDDEN = ("fc1", "fc2")


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


def _keep(layer: nn.Linear, removal: float) -> int:
    return max(1, round((1 - removal) * layer.out_features))


@torch.no_grad()
def prune(model: nn.Sequential, removal: float, compensate: bool) -> nn.Sequential:
    """Remove the hidden neurons of smallest L1 incoming norm; with `compensate`, each removed
    neuron's outgoing weights go, times its norm ratio, to the kept neuron most cosine-similar
    to it (Kim et al. 2020's Neuron Merging, data-free)."""
    pruned = copy.deepcopy(model)
    for name, following in zip(HIDDEN, ("fc2", "fc3")):
        layer, after = getattr(pruned, name), getattr(pruned, following)
        incoming = torch.cat([layer.weight, layer.bias[:, None]], dim=1)
        kept = incoming.abs().sum(1).argsort(descending=True)[:_keep(layer, removal)].sort().values
        removed = torch.tensor([i for i in range(layer.out_features) if i not in set(kept.tolist())], dtype=torch.long)
        outgoing = after.weight.clone()
        if compensate and len(removed):
            norms = incoming.norm(dim=1).clamp_min(1e-12)
            unit = incoming / norms[:, None]
            similarity = unit[removed] @ unit[kept].T
            best = similarity.argmax(1)
            for j, target in zip(removed.tolist(), kept[best].tolist()):
                outgoing[:, target] += (norms[j] / norms[target]) * outgoing[:, j]
        layer.weight = nn.Parameter(layer.weight[kept].clone())
        layer.bias = nn.Parameter(layer.bias[kept].clone())
        layer.out_features = len(kept)
        after.weight = nn.Parameter(outgoing[:, kept].clone())
        after.in_features = len(kept)
    return pruned


def compress(model: nn.Sequential, method: str, removal: float) -> nn.Sequential:
    if method == "h0":
        return merge_neurons(model, {name: _keep(getattr(model, name), removal) for name in HIDDEN})[0]
    return prune(model, removal, compensate=method == "cosine")


def run_seed(seed: int, epochs: int, weight: float, data) -> dict:
    """Both trainings of one seed and every compression of each, as and after fine-tuning."""
    started = time.perf_counter()
    networks = {}
    for network in ("plain", "penalty"):
        torch.manual_seed(seed)
        model = build_mlp(WIDTHS)
        penalty = MergePenalty(model, keep=0.5, weight=weight, layers=list(HIDDEN)) if network == "penalty" else None
        train(model, data, epochs, seed, penalty)
        networks[network] = model
    record = {"seed": seed, "epochs": epochs, "weight": weight,
              "unmerged": {network: accuracy(model, data) for network, model in networks.items()}, "results": []}
    for (network, model), method, removal in itertools.product(networks.items(), METHODS, REMOVALS):
        small = compress(model, method, removal)
        as_is = accuracy(small, data)
        train(small, data, 1, 1000 + seed)  # one epoch of fine-tuning, the same order for every method
        record["results"].append({"network": network, "method": method, "removal": removal,
                                  "accuracy": as_is, "fine_tuned": accuracy(small, data),
                                  "parameters": sum(p.numel() for p in small.parameters())})
    record["seconds"] = time.perf_counter() - started
    return record


def choose_weight(epochs: int, data, folder: Path) -> float:
    """The largest pilot weight whose penalised network is within 1 point of plain (pilot seeds)."""
    path = folder / "pilot.json"
    if path.exists():
        return json.loads(path.read_text())["chosen"]
    rows, runs = {}, []
    for weight in PILOT_WEIGHTS:
        gaps = []
        for seed in PILOT_SEEDS:
            accuracies = {}
            for network in ("plain", "penalty"):
                torch.manual_seed(seed)
                model = build_mlp(WIDTHS)
                penalty = (MergePenalty(model, keep=0.5, weight=weight, layers=list(HIDDEN))
                           if network == "penalty" else None)
                train(model, data, epochs, seed, penalty)
                accuracies[network] = accuracy(model, data)
            gaps.append(accuracies["plain"] - accuracies["penalty"])
            runs.append({"weight": weight, "seed": seed, **accuracies})
        rows[str(weight)] = float(np.mean(gaps))
    allowed = [w for w in PILOT_WEIGHTS if rows[str(w)] <= 0.01]
    chosen = max(allowed) if allowed else min(PILOT_WEIGHTS)
    path.write_text(json.dumps({"seeds": list(PILOT_SEEDS), "runs": runs, "mean_accuracy_loss": rows,
                                "chosen": chosen}, indent=2))
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
    def values(network, method, removal, key="accuracy"):
        return [next(r[key] for r in rec["results"] if (r["network"], r["method"], r["removal"]) ==
                     (network, method, removal)) for rec in records]

    table = {f"{network}/{method}/{removal:g}": {
        "accuracy": float(np.median(values(network, method, removal))),
        "fine_tuned": float(np.median(values(network, method, removal, "fine_tuned")))}
        for network, method, removal in itertools.product(("plain", "penalty"), METHODS, REMOVALS)}
    tests, goal = {}, {}
    for removal in (0.5, 0.75):
        ours = values("penalty", "h0", removal)
        others = {f"{n}/{m}": values(n, m, removal) for n, m in itertools.product(("plain", "penalty"), METHODS)
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
            "unmerged": {n: float(np.median([rec["unmerged"][n] for rec in records])) for n in ("plain", "penalty")},
            "table": table, "tests": tests, "seeds_beating_every_other": goal}


def plot_curves(summary: dict, path: Path) -> None:
    """Median test accuracy against the fraction of hidden neurons removed: one line per network ×
    method, as is (left) and after one epoch of fine-tuning (right)."""
    from topoopt.plotting import new_figure, save_png

    figure = new_figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    colours = {"l1": "tab:grey", "cosine": "tab:blue", "h0": "tab:red"}
    for ax, key, title in zip(axes, ("accuracy", "fine_tuned"), ("as is", "after one epoch of fine-tuning")):
        for network, method in itertools.product(("plain", "penalty"), METHODS):
            values = [summary["unmerged"][network]] + [summary["table"][f"{network}/{method}/{r:g}"][key]
                                                       for r in REMOVALS]
            name = {"l1": "L1 pruning", "cosine": "cosine merge", "h0": "H0 merge"}[method]
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
    for network, method in itertools.product(("plain", "penalty"), METHODS):
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
    parser.add_argument("--out", default=None,
                        help=f"results folder (default {RESULTS}; {RESULTS / 'quick'} with --quick)")
    args = parser.parse_args(argv)
    seeds, epochs = (2, 2) if args.quick else (args.seeds, args.epochs)
    folder = Path(args.out) if args.out else RESULTS / "quick" if args.quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    data = load_dataset("mnist5k")
    weight = 1e-2 if args.quick else choose_weight(epochs, data, folder)
    records = []
    for seed in range(seeds):
        path = folder / f"seed{seed}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            continue
        record = run_seed(seed, epochs, weight, data)
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
