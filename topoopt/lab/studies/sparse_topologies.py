"""Sparse networks wired by bipartite graphs: accuracy against expansion, not density.

Reproduces the question of Bourely, Boueri & Choromanski, "Sparse Neural Networks Topologies"
(arXiv 1706.05683): do sparse layers fixed before training by random or structured bipartite
graphs match dense ones, with accuracy following the graphs' spectral gap and algebraic
connectivity rather than their density?

Model: `depth` SparseLinear layers of equal width (the first one reading the pixels, each layer
its own mask of the same family and degree), then a dense output layer. Data: `digits` with a
fixed random pixel permutation (banded masks get no locality advantage), or `mnist5k`. Every
cell (mask family × degree × mask seed × training seed) is one run; finished cells are skipped
on re-run.

Each mask family draws from its own seed stream (`family_seed`), and a network whose masks are
identical to an earlier one's (same fingerprint) is dropped before training and listed in the
summary, so no wiring is counted twice. Cell ids carry the fingerprint, so a results file from
another wiring is never mistaken for this one.

    topoopt sparse --quick      # (or python experiments/sparse_topologies.py --quick): minutes
    topoopt sparse              # the full grid

Results go to ``--out``/DATASET (default experiments/results/sparse_topologies, or its quick/
folder with --quick), TensorBoard hparams to ``--tensorboard``/DATASET (default
tensorboard_logs/sparse_topologies[_quick]).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from topoopt.lab.data import load_dataset
from topoopt.lab.loop import fit, make_optimizer
from topoopt.lab.studies.options import add_sweep_options, apply_overrides, command_parser, output_folders
from topoopt.lab.studies.statistics import partial_spearman
from topoopt.lab.sweep import COMPACT_RESULTS, claim_folder, restore_from_compact, run_cells, save_compact
from topoopt.plotting import new_figure, save_png
from topoopt.sparse import SparseLinear, block_diagonal, family_seed, graph_measures, make_mask, mask_fingerprint

# The command line's defaults (relative to the current folder); `run_study` takes its folders.
DEFAULT_OUT = Path("experiments") / "results" / "sparse_topologies"
DEFAULT_TENSORBOARD = Path("tensorboard_logs") / "sparse_topologies"


@dataclass
class StudyConfig:
    dataset: str = "digits"
    width: int = 64
    depth: int = 3
    degree: int = 4
    other_degrees: list[int] = field(default_factory=lambda: [3, 8, 16])
    rewire_p: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0])
    masks_per_family: int = 6
    seeds: int = 3
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3

    @classmethod
    def quick(cls) -> "StudyConfig":
        return cls(other_degrees=[8], rewire_p=[0.05, 0.3, 1.0], masks_per_family=2, seeds=2, epochs=25)


def mask_specs(config: StudyConfig) -> list[dict]:
    """Masks at the main degree (≥ 40 for the full grid) plus a few at other degrees."""
    specs = [{"family": "banded", "degree": config.degree, "mask_seed": 0, "p": 0.0}]
    for p in config.rewire_p:
        for s in range(max(1, config.masks_per_family // 3)):
            specs.append({"family": "rewired", "degree": config.degree, "mask_seed": s, "p": p})
    for family in ("biregular", "erdos_renyi", "xnet", "expander"):
        specs += [{"family": family, "degree": config.degree, "mask_seed": s, "p": 0.0}
                  for s in range(config.masks_per_family)]
    specs += [{"family": "block_diagonal", "degree": config.degree, "mask_seed": b, "p": 0.0} for b in (2, 4)]
    for degree in config.other_degrees:
        specs.append({"family": "banded", "degree": degree, "mask_seed": 0, "p": 0.0})
        specs += [{"family": "biregular", "degree": degree, "mask_seed": s, "p": 0.0} for s in range(2)]
    return specs


def layer_masks(spec: dict, n_features: int, width: int, depth: int) -> list[torch.Tensor]:
    """One out × in mask per sparse layer: n_features → width, then width → width."""
    masks = []
    for layer in range(depth):
        fan_in = n_features if layer == 0 else width
        # The first layer keeps the same number of edges per neuron relative to its inputs.
        degree = spec["degree"] * (fan_in // width) if layer == 0 else spec["degree"]
        if spec["family"] == "dense":
            masks.append(torch.ones(width, fan_in))
        elif spec["family"] == "block_diagonal":
            masks.append(block_diagonal(width, fan_in, degree, blocks=spec["mask_seed"]))
        else:
            masks.append(make_mask(spec["family"], width, fan_in, degree, p=spec["p"],
                                   seed=family_seed(spec["family"], spec["mask_seed"], layer)))
    return masks


def mask_id(spec: dict) -> str:
    return f"{spec['family']}-d{spec['degree']}-m{spec['mask_seed']}-p{spec['p']}"


def unique_specs(specs: list[dict], n_features: int, width: int, depth: int) -> tuple[list[dict], list[dict]]:
    """The specs whose networks' masks differ from every earlier spec's (each with its
    `mask_hash`), and the dropped duplicates with the mask they repeat."""
    seen: dict[str, str] = {}
    kept, duplicates = [], []
    for spec in specs:
        fingerprint = mask_fingerprint(layer_masks(spec, n_features, width, depth))
        if fingerprint in seen:
            duplicates.append({"mask_id": mask_id(spec), "same_as": seen[fingerprint], "mask_hash": fingerprint})
        else:
            seen[fingerprint] = mask_id(spec)
            kept.append({**spec, "mask_hash": fingerprint})
    return kept, duplicates


def load_permuted(name: str):
    data = load_dataset(name)
    permutation = torch.from_numpy(np.random.default_rng(12345).permutation(data.n_features))
    return type(data)(data.name, data.x_train[:, permutation], data.y_train, data.x_test[:, permutation], data.y_test)


def build_model(n_features: int, n_classes: int, width: int, masks: list[torch.Tensor], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    generator = torch.Generator().manual_seed(seed)
    for mask in masks:  # the dense baseline passes all-ones masks: same depth, same init rule
        layers += [SparseLinear(mask.shape[1], mask.shape[0], mask, generator=generator), nn.ReLU()]
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def run_cell(cell: dict) -> dict:
    config = StudyConfig(**cell["config"])
    data = load_permuted(config.dataset)
    masks = layer_masks(cell, data.n_features, config.width, config.depth)
    measures = [graph_measures(m) for m in masks]
    if mask_fingerprint(masks) != cell["mask_hash"]:
        raise RuntimeError(f"{cell['id']}: masks differ from those the cell was planned with")
    model = build_model(data.n_features, data.n_classes, config.width, masks, cell["seed"])
    optimizer = make_optimizer(model, "adam", lr=config.lr)
    history = fit(model, data, config.epochs, config.batch_size, optimizer, seed=cell["seed"])
    reached = [row["epoch"] for row in history if row["train_accuracy"] >= 0.9]
    return {
        **{k: cell[k] for k in ("family", "degree", "mask_seed", "p", "seed")},
        "mask_id": cell["mask_id"],
        "mask_hash": cell["mask_hash"],
        "test_accuracy": history[-1]["test_accuracy"],
        "train_accuracy": history[-1]["train_accuracy"],
        "epochs_to_90": reached[0] if reached else None,
        "density": float(np.mean([m.density for m in measures])),
        "min_spectral_gap": min(m.spectral_gap for m in measures),
        "min_normalized_gap": min(m.normalized_gap for m in measures),
        "min_algebraic_connectivity": min(m.algebraic_connectivity for m in measures),
        "min_ramanujan_margin": min(m.ramanujan_margin for m in measures),
        "all_connected": all(m.connected for m in measures),
        # Isolated nodes: units without inputs (any layer) or whose output no later sparse layer
        # reads (layers ≥ 2's columns); the first layer's unread columns are unused pixels.
        "isolated_units": sum(m.isolated_outputs for m in measures) + sum(m.isolated_inputs for m in measures[1:]),
        "unused_inputs": measures[0].isolated_inputs,
    }


def make_cells(config: StudyConfig, n_features: int) -> tuple[list[dict], list[dict]]:
    """The cells to run (distinct networks only) and the duplicate masks that were dropped."""
    plain = asdict(config)
    specs = mask_specs(config) + [{"family": "dense", "degree": config.width, "mask_seed": 0, "p": 0.0}]
    kept, duplicates = unique_specs(specs, n_features, config.width, config.depth)
    cells = []
    for spec in kept:
        name = mask_id(spec)
        for seed in range(config.seeds):
            cells.append({**spec, "seed": seed, "mask_id": name,
                          "id": f"{config.dataset}/{name}/{spec['mask_hash']}/s{seed}", "config": plain})
    return cells, duplicates


# ---- statistics ----

def analyse(records: list[dict], config: StudyConfig) -> dict:
    from scipy import stats

    by_mask: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_mask[record["mask_id"]].append(record)
    hashes = [rows[0]["mask_hash"] for rows in by_mask.values()]
    if len(set(hashes)) != len(hashes):
        raise ValueError("the same masks appear under two mask ids: deduplicate before analysing")
    masks = []
    for mask_id, rows in by_mask.items():
        first = rows[0]
        masks.append({**{k: first[k] for k in ("family", "degree", "density", "min_spectral_gap", "min_normalized_gap",
                                                "min_algebraic_connectivity", "min_ramanujan_margin", "all_connected",
                                                "isolated_units", "unused_inputs", "mask_hash")},
                      "mask_id": mask_id, "accuracy": float(np.mean([r["test_accuracy"] for r in rows])),
                      "accuracy_std": float(np.std([r["test_accuracy"] for r in rows])),
                      "epochs_to_90": [r["epochs_to_90"] for r in rows]})
    sparse = [m for m in masks if m["family"] != "dense"]
    fixed = [m for m in sparse if m["degree"] == config.degree]
    acc = np.array([m["accuracy"] for m in fixed])
    summary: dict = {"n_runs": len(records), "n_masks_fixed_density": len(fixed),
                     "fixed_density": fixed[0]["density"] if fixed else None}
    for measure in ("min_spectral_gap", "min_algebraic_connectivity"):
        values = np.array([m[measure] for m in fixed])
        rho, p = stats.spearmanr(values, acc)
        summary[f"spearman_{measure}"] = {"rho": float(rho), "p": float(p)}
    connected = [m for m in fixed if m["all_connected"]]
    if len(connected) > 3:
        for measure in ("min_spectral_gap", "min_algebraic_connectivity"):
            rho, p = stats.spearmanr([m[measure] for m in connected], [m["accuracy"] for m in connected])
            summary[f"spearman_{measure}_connected_only"] = {"rho": float(rho), "p": float(p), "n": len(connected)}
    # λ₂ = 0 wherever a node is isolated: for Erdős–Rényi and X-Net it then counts dead units,
    # not expansion, so report those masks on their own.
    disconnected = [m for m in fixed if not m["all_connected"]]
    summary["disconnected_masks_fixed_density"] = {
        family: {"n": sum(m["family"] == family for m in disconnected),
                 "of": sum(m["family"] == family for m in fixed),
                 "isolated_units": [m["isolated_units"] for m in disconnected if m["family"] == family],
                 "unused_inputs": [m["unused_inputs"] for m in disconnected if m["family"] == family]}
        for family in sorted({m["family"] for m in disconnected})}
    uneven = [m for m in fixed if m["family"] in ("erdos_renyi", "xnet")]
    if len(uneven) > 3 and len({m["isolated_units"] for m in uneven}) > 1:
        rho, p = stats.spearmanr([m["isolated_units"] for m in uneven], [m["accuracy"] for m in uneven])
        summary["spearman_isolated_units_erdos_renyi_xnet"] = {"rho": float(rho), "p": float(p), "n": len(uneven)}
    all_acc = np.array([m["accuracy"] for m in sparse])
    log_density = np.log(np.array([m["density"] for m in sparse]))
    gaps = np.array([m["min_spectral_gap"] for m in sparse])
    alg = np.array([m["min_algebraic_connectivity"] for m in sparse])
    for name, values in (("gap", gaps), ("algebraic", alg)):
        rho, p = partial_spearman(values, all_acc, log_density)
        summary[f"partial_spearman_{name}_given_density"] = {"rho": rho, "p": p}
    summary["n_masks_all_densities"] = len(sparse)
    biregular = [m for m in sparse if m["family"] == "biregular"]
    summary["biregular_meeting_ramanujan_bound"] = {"n": sum(m["min_ramanujan_margin"] >= 0 for m in biregular),
                                                    "of": len(biregular)}
    design = np.column_stack([np.ones(len(sparse)), gaps, log_density])
    coef, *_ = np.linalg.lstsq(design, all_acc, rcond=None)
    fitted = design @ coef
    r2 = 1 - np.sum((all_acc - fitted) ** 2) / np.sum((all_acc - all_acc.mean()) ** 2)
    summary["regression_accuracy_on_gap_and_log_density"] = {"intercept": float(coef[0]), "gap": float(coef[1]),
                                                             "log_density": float(coef[2]), "r2": float(r2)}
    families = defaultdict(list)
    for m in fixed:
        families[m["family"]].append(m["accuracy"])
    groups = [v for v in families.values() if len(v) > 1]
    if len(groups) > 1:
        h, p = stats.kruskal(*groups)
        summary["kruskal_wallis_families"] = {"H": float(h), "p": float(p)}
    summary["family_mean_accuracy_fixed_density"] = {f: float(np.mean(v)) for f, v in sorted(families.items())}
    dense = [m for m in masks if m["family"] == "dense"]
    if dense:
        summary["dense_accuracy"] = dense[0]["accuracy"]
    return {"summary": summary, "masks": masks}


def plot(masks: list[dict], out: Path) -> None:
    from matplotlib import colormaps

    colours = colormaps["tab10"]
    families = sorted({m["family"] for m in masks if m["family"] != "dense"})
    figure = new_figure(figsize=(11, 4.5))
    left, right = figure.subplots(1, 2)
    for i, family in enumerate(families):
        rows = [m for m in masks if m["family"] == family]
        accuracy = [m["accuracy"] for m in rows]
        left.scatter([m["min_spectral_gap"] for m in rows], accuracy, label=family, color=colours(i), s=18)
        right.scatter([m["density"] for m in rows], accuracy, label=family, color=colours(i), s=18)
    for m in masks:
        if m["family"] == "dense":
            for axes in (left, right):
                axes.axhline(m["accuracy"], color="black", linestyle="--", linewidth=0.8, label="dense")
    left.set(xlabel="smallest per-layer spectral gap σ₁ − σ₂", ylabel="test accuracy (mean over seeds)",
             title="accuracy against expansion")
    right.set(xlabel="density", xscale="log", ylabel="test accuracy", title="accuracy against density")
    left.legend(fontsize=7)
    figure.tight_layout()
    save_png(figure, out / "accuracy_vs_gap_and_density.png", dpi=120)


def write_tensorboard(records: list[dict], log_dir: Path) -> None:
    """One HParams run per cell; a cell whose run an earlier invocation wrote is not written again."""
    from torch.utils.tensorboard import SummaryWriter

    new = {record["id"].replace("/", "_"): record for record in records}
    new = {name: record for name, record in new.items() if not (Path(log_dir) / name).exists()}
    if not new:
        return
    with SummaryWriter(log_dir) as writer:
        for name, record in new.items():
            hparams = {k: record[k] for k in ("family", "degree", "mask_seed", "p", "seed")}
            metrics = {f"hparam/{k}": float(record[k])
                       for k in ("test_accuracy", "min_spectral_gap", "min_algebraic_connectivity", "density")}
            writer.add_hparams(hparams, metrics, run_name=name)


def write_masks(masks: list[dict], path: Path) -> None:
    """One CSV row per mask (its measures and mean accuracy; not the per-seed epochs to 90%)."""
    columns = [k for k in masks[0] if k != "epochs_to_90"]
    with open(path, "w") as handle:
        handle.write(",".join(columns) + "\n")
        for m in masks:
            handle.write(",".join(str(m[c]) for c in columns) + "\n")


def run_study(config: StudyConfig, out: Path, tensorboard: Path | None = None, jobs: int = 1, executor: str = "process",
              progress: bool = True) -> dict:
    """Run the grid's unfinished cells for ``config.dataset`` (results in ``out/runs.jsonl``),
    analyse them and write ``config.json``, ``summary.json``, ``masks.csv`` and the figure into
    `out`; TensorBoard hparams go to `tensorboard` (None: none). Returns the analysis."""
    cells, duplicates = make_cells(config, load_permuted(config.dataset).n_features)
    claim_folder(out, asdict(config), grid=("other_degrees", "rewire_p", "masks_per_family", "seeds"))
    restore_from_compact(out / "runs.jsonl", out / COMPACT_RESULTS)
    records = run_cells(cells, run_cell, out / "runs.jsonl", jobs=jobs, executor=executor, progress=progress,
                        desc=f"sparse {config.dataset}")
    save_compact(records, out / COMPACT_RESULTS)
    analysis = analyse(records, config)
    analysis["summary"]["duplicate_masks_dropped"] = duplicates
    (out / "summary.json").write_text(json.dumps(analysis["summary"], indent=2))
    write_masks(analysis["masks"], out / "masks.csv")
    plot(analysis["masks"], out)
    if tensorboard is not None:
        write_tensorboard(records, tensorboard)
    return analysis


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser("sparse", __doc__)
    add_sweep_options(parser, out_help=f"results folder (default {DEFAULT_OUT}; with --quick, {DEFAULT_OUT}/quick); "
                                       f"the dataset's folder is made in it",
                      tensorboard_help=f"TensorBoard folder (default {DEFAULT_TENSORBOARD}; with --quick, "
                                       f"{DEFAULT_TENSORBOARD}_quick); likewise")
    parser.add_argument("--dataset", choices=["digits", "mnist5k"], default="digits")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    config = StudyConfig.quick() if args.quick else StudyConfig()
    config.dataset = args.dataset
    apply_overrides(config, args, ("seeds", "epochs"))
    out, tensorboard = output_folders(args, DEFAULT_OUT, DEFAULT_TENSORBOARD)
    analysis = run_study(config, out / config.dataset, tensorboard / config.dataset, jobs=args.jobs,
                         executor=args.executor, progress=not args.no_progress)
    print(json.dumps(analysis["summary"], indent=2))
    print(f"results in {out / config.dataset}")
    return analysis


if __name__ == "__main__":
    main()
