"""What a user sees: a short demo run logged by `TopologyMonitor`, TensorBoard served on 127.0.0.1,
and a screenshot of each view taken with headless Chromium (Debian's ``chromium``).

    python benchmarks/screenshots.py --out /tmp/screens     # about a minute

Writes ``<view>.png`` for the page TensorBoard opens on (``landing``) and the Scalars, Custom
Scalars, Images and Text views. Look at them: the
point is what a person sees, which no assertion on event files can tell.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

VIEWS = {"landing": "", "scalars": "#timeseries", "custom_scalars": "#custom_scalars", "images": "#images",
         "text": "#text"}


def demo_run(log_dir: Path) -> None:
    """A default-initialised MLP on digits for 300 steps, with the monitor, a calm TopoOptimizer
    and two copies planted in the second layer (so an alert shows)."""
    from topoopt import TopologyMonitor, TopoOptimizer
    from topoopt.lab.data import load_dataset
    from topoopt.lab.models import build_mlp

    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_mlp("mlp:64-32-16-10")
    with torch.no_grad():  # a true copy: same incoming weights and bias, same outgoing column, so it stays one
        model.fc2.weight[1].copy_(model.fc2.weight[0])
        model.fc2.bias[1].copy_(model.fc2.bias[0])
        model.fc3.weight[:, 1].copy_(model.fc3.weight[:, 0])
    optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, every=5)
    with TopologyMonitor(model, log_dir=str(log_dir), every=10, diagrams_every=100, optimizer=optimizer) as monitor:
        for step in range(300):
            batch = torch.randint(0, len(data.y_train), (64,))
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            optimizer.step()
            monitor.step(step)
            monitor.log_scalars({"train/loss": float(loss)}, step)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="screens")
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.browser:
        sys.exit("no chromium found: install Debian's `chromium`, or pass --browser")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "run"
    shutil.rmtree(log_dir, ignore_errors=True)
    demo_run(log_dir)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=1)
                break
            except OSError:
                time.sleep(1)
        for view, anchor in VIEWS.items():
            subprocess.run([args.browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--window-size=1500,1100", "--virtual-time-budget=15000",
                            f"--screenshot={(out / f'{view}.png').resolve()}", f"http://127.0.0.1:{port}/{anchor}"],
                           check=False, capture_output=True, timeout=120)
            print(out / f"{view}.png")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
