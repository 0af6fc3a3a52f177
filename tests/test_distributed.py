"""Sharded and data-parallel training on CPU with gloo, two processes: FSDP2 (each layer sharded,
and the root only), DDP, and ZeRO both ways, with TopoOptimizer, TopoPenalty and TopologyMonitor
together. Every rank must compute the same scales, and the weights must match one process that
sees both ranks' batches. Collectives time out after 60 s, and each run after 240 s: a hang fails."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(scenario: str, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(WORKER), scenario, str(out), str(free_port())],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    if scenario == "reference":
        return [torch.load(out / "reference.pt", weights_only=False)]
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for rank, result in enumerate(ranks):
        assert "traceback" not in result, f"rank {rank}:\n{result['traceback']}"
    return ranks


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return launch("reference", tmp_path_factory.mktemp("reference"))[0]


@pytest.mark.parametrize("scenario", ["fsdp_layers", "fsdp_root", "ddp", "zero_outside"])
def test_every_rank_scales_alike_and_matches_one_process(scenario, reference, tmp_path):
    ranks = launch(scenario, tmp_path)
    assert ranks[0]["scales"] == ranks[1]["scales"] == reference["scales"]
    assert any(abs(s - 1) > 0.1 for s in reference["scales"].values())  # the scales do act
    for result in ranks:
        for name, expected in reference["weights"].items():
            torch.testing.assert_close(result["weights"][name], expected, rtol=1e-5, atol=1e-6)
    assert set(ranks[0]["monitor_last"]) == set(reference["scales"])  # rank 0 logged every layer
    assert (tmp_path / "tb").is_dir()


def test_topo_optimizer_inside_zero_is_refused_naming_the_order_that_works(tmp_path):
    ranks = launch("zero_inside", tmp_path)
    for result in ranks:
        assert "wrap ZeRO instead: TopoOptimizer(ZeroRedundancyOptimizer(" in result["error"]
