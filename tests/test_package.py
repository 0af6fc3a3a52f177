"""The package as installed: a light core import, and the public names."""

import subprocess
import sys

import topoopt

HEAVY = ["sklearn", "scipy", "matplotlib", "tensorboard", "gudhi", "networkx", "torchvision", "mlxtend",
         "lightning", "torch_topological"]


def test_importing_topoopt_loads_only_the_core():
    code = f"import sys, topoopt; print([m for m in {HEAVY!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_every_public_name_resolves():
    for name in topoopt.__all__:
        assert getattr(topoopt, name) is not None
    assert "TopologyMonitor" in dir(topoopt)
