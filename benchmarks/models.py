"""What topology costs on the models people train: one full measurement against one training step.

For each model (random weights, built from configs), at each thread count, in one run:

- ``step``: the median of plain AdamW training steps (forward, backward, step);
- ``measure``: one exact measurement of every measured cloud, as `TopoOptimizer.update_scales`
  makes it on a measuring step (a fresh `TreeCache` each time, so every tree is searched);
- ``penalty``: `TopoPenalty`'s forward and backward over every cloud (fresh trees too);
- ``idle``: a `TopoOptimizer` step that does not measure (``calm`` at initialisation, all scales
  1), against the plain step measured beside it.

It prints the ratios to the plain step, and what ``every`` = 1, 10, 100 add to a step, derived
as measure / (every · step). ``--busy 2`` runs two busy processes beside it (a shared machine).

    python benchmarks/models.py                 # all models, 1 and 2 threads, quiet
    python benchmarks/models.py --busy 2 --models gpt2_small --threads 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from topoopt import TopoOptimizer, TopoPenalty, TreeCache, coverage


def _mlp():
    from topoopt.lab.models import build_mlp

    model = build_mlp("mlp:784-1000-1000-10")
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    return model, lambda: F.cross_entropy(model(x), y)


def _resnet18():
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 1000, (32,))
    return model, lambda: F.cross_entropy(model(x), y)


def _vit_tiny():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    x, y = torch.randn(32, 3, 224, 224), torch.randint(0, 1000, (32,))
    return model, lambda: F.cross_entropy(model(x), y)


def _gpt2_small():
    from transformers import GPT2Config, GPT2LMHeadModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(GPT2Config())
    tokens = torch.randint(0, 50257, (4, 128))
    return model, lambda: model(tokens, labels=tokens).loss


MODELS = {"mlp_784_1000_1000_10": _mlp, "resnet18": _resnet18, "vit_tiny": _vit_tiny, "gpt2_small": _gpt2_small}


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _busy(stop):
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def run(name: str, threads: int, repeats: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_fn = MODELS[name]()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def plain_step():
        plain.zero_grad()
        loss_fn().backward()
        plain.step()

    wrapped = TopoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model, every=10**9)
    wrapped.step()  # the first step measures; the ones timed below do not

    def idle_step():
        wrapped.zero_grad()
        loss_fn().backward()
        wrapped.step()

    def measure():
        wrapped.trees = TreeCache()
        wrapped.update_scales()

    penalty = TopoPenalty(model, weight=1e-3)

    def penalty_pass():
        penalty.trees = TreeCache()
        penalty().backward()

    plain_step()  # warm-up
    idle_step()
    figures = {"step": [], "idle": []}
    for _ in range(repeats):  # interleaved, so drift hits both alike
        figures["step"].append(_median(plain_step, 1))
        figures["idle"].append(_median(idle_step, 1))
    step, idle = statistics.median(figures["step"]), statistics.median(figures["idle"])
    measured = _median(measure, repeats)
    with_backward = _median(penalty_pass, repeats)
    report = coverage(model)
    return {"clouds": len(report.measured), "gflop": sum(c.gram_gflop for c in report.measured.values()),
            "step_s": step, "measure": measured / step, "penalty": with_backward / step, "idle": idle / step,
            "every10": measured / (10 * step), "every100": measured / (100 * step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="busy processes to run beside the benchmark")
    args = parser.parse_args()
    stop = multiprocessing.Event()
    workers = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True) for _ in range(args.busy)]
    for worker in workers:
        worker.start()
    try:
        print(f"{'model':<22} {'thr':>3} {'clouds':>6} {'GFLOP':>7} {'step s':>7} {'measure':>8} "
              f"{'+backward':>9} {'idle step':>9} {'every=10':>8} {'every=100':>9}   (ratios to a plain step; "
              f"busy processes: {args.busy})")
        for name in args.models:
            for threads in args.threads:
                r = run(name, threads, args.repeats)
                print(f"{name:<22} {threads:>3} {r['clouds']:>6} {r['gflop']:>7.1f} {r['step_s']:>7.3f} "
                      f"{r['measure']:>7.2f}× {r['penalty']:>8.2f}× {r['idle']:>8.3f}× {r['every10']:>7.3f}× "
                      f"{r['every100']:>8.4f}×", flush=True)
    finally:
        stop.set()
        for worker in workers:
            worker.join()


if __name__ == "__main__":
    main()
