"""Two-process runs on CPU with gloo for tests/test_distributed.py: ``python distributed_worker.py
<scenario> <out_dir> <port>``. Each rank writes its final weights, scales and what it saw to
<out_dir>/rank<r>.pt; every collective has a timeout, so a hang is a failure, not a stall."""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 3


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(),
                         nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 4, (4,), generator=generator)


def train(model: nn.Module, optimizer, penalty, monitor, batches) -> None:
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = sum(nn.functional.cross_entropy(model(x), y) for x, y in batches) / len(batches) + penalty()
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(step)


def reference(out_dir: str) -> None:
    """One process, both ranks' batches: what the 2-rank runs must reproduce."""
    from topoopt import TopoOptimizer, TopoPenalty

    model = build()
    optimizer = TopoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, every=1, policy="contrast")
    train(model, optimizer, TopoPenalty(model, weight=0.1), None, [batch(0), batch(1)])
    torch.save({"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "scales": dict(optimizer.scales)}, os.path.join(out_dir, "reference.pt"))


def run(rank: int, scenario: str, out_dir: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    from topoopt import TopologyMonitor, TopoOptimizer, TopoPenalty

    result: dict = {}
    try:
        model = build()
        if scenario.startswith("fsdp"):
            from torch.distributed.fsdp import fully_shard

            if scenario == "fsdp_layers":
                for module in model:
                    if isinstance(module, (nn.Linear, nn.Conv2d)):
                        fully_shard(module)
            fully_shard(model)
            trained = model
        elif scenario in ("ddp", "zero_outside"):
            trained = nn.parallel.DistributedDataParallel(model)
        elif scenario == "zero_inside":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            try:
                ZeroRedundancyOptimizer(model.parameters(), optimizer_class=TopoOptimizer, inner=torch.optim.AdamW)
            except TypeError as error:
                result["error"] = str(error)
            return
        else:
            raise ValueError(scenario)
        if scenario == "zero_outside":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            inner = ZeroRedundancyOptimizer(trained.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
        else:
            inner = torch.optim.AdamW(trained.parameters(), lr=1e-2)
        optimizer = TopoOptimizer(inner, trained, every=1, policy="contrast")
        penalty = TopoPenalty(trained, weight=0.1)
        log_dir = os.path.join(out_dir, "tb")
        with TopologyMonitor(trained, log_dir=log_dir, every=1, diagrams_every=0, optimizer=optimizer) as monitor:
            train(trained, optimizer, penalty, monitor, [batch(rank)])
            result["monitor_last"] = {k: dict(v) for k, v in monitor.last.items()}
        state = model.state_dict()
        result["weights"] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                             for k, v in state.items()}
        result["scales"] = dict(optimizer.scales)
    except Exception:  # reported to the test, which fails with it
        result["traceback"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears gloo down: rank 0 alone writes the monitor's files at
        # close, and a rank destroying its group while the other still uses it aborts the process.
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    scenario, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if scenario == "reference":
        reference(out_dir)
        return
    mp.spawn(run, args=(scenario, out_dir, port), nprocs=2)


if __name__ == "__main__":
    main()
