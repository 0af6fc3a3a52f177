"""TopologyMonitor: event files read back, skipped layers, hparams, and a live TensorBoard server."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from topoopt import TopoOptimizer
from topoopt.lab.models import build_mlp
from topoopt.monitor import TopologyMonitor, tag


def events(log_dir):
    accumulator = EventAccumulator(str(log_dir),
                                   size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def run_monitor(log_dir, steps=4, **kwargs):
    model = build_mlp("mlp:12-8-6-3")
    optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, every=1, policy="calm")
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    with TopologyMonitor(model, log_dir=log_dir, optimizer=optimizer, **kwargs) as monitor:
        for step in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            monitor.step(step)
        monitor.close(hparams={"lr": 0.1, "topo": True}, final={"accuracy": 0.5})
    return model, monitor


def test_scalars_follow_the_tag_scheme_and_match_the_monitor(tmp_path):
    _, monitor = run_monitor(tmp_path, diagrams_every=2)
    acc = events(tmp_path)
    scalar_tags = set(acc.Tags()["scalars"])
    for layer in ("fc1", "fc2", "fc3"):
        assert {f"topology/{layer}/normalized_entropy", f"topology/{layer}/mean_lifetime",
                f"optim/{layer}/lr_scale"} <= scalar_tags
    series = acc.Scalars("topology/fc2/mean_lifetime")
    assert [e.step for e in series] == [0, 1, 2, 3]
    assert series[-1].value == pytest.approx(monitor.last["fc2"]["mean_lifetime"], rel=1e-6)
    assert {"topology_diagram/fc1", "topology_barcode/fc1"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("topology_diagram/fc1")] == [0, 2]
    assert "topology_deaths/fc3" in acc.Tags()["histograms"]
    # TensorBoard opens on Time Series, whose groups sort by name: the signals come before the figures.
    groups = sorted({t.split("/")[0] for kind in ("scalars", "images", "histograms") for t in acc.Tags()[kind]})
    assert groups.index("topology") < min(groups.index(g) for g in groups if g.startswith("topology_"))


def test_dotted_layer_names_become_slashes():
    assert tag("topology", "encoder.0", "mean_lifetime") == "topology/encoder/0/mean_lifetime"


def test_bad_layer_is_skipped_once_with_its_reason(tmp_path):
    model = build_mlp("mlp:12-8-6-3")
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with TopologyMonitor(model, log_dir=tmp_path) as monitor:
        monitor.step(0)
        monitor.step(1)
    assert "NaN or Inf" in monitor.skipped["fc2"]
    acc = events(tmp_path)
    assert "topology/fc1/mean_lifetime" in acc.Tags()["scalars"]
    assert "topology/fc2/mean_lifetime" not in acc.Tags()["scalars"]
    assert acc.Tags()["tensors"].count("skipped/fc2/text_summary") == 1


def test_invalid_arguments():
    model = build_mlp("mlp:4-3-2")
    with pytest.raises(ValueError, match="exactly one of log_dir and writer"):
        TopologyMonitor(model)
    with pytest.raises(ValueError, match="Invalid metric: 'entropie'"):
        TopologyMonitor(model, log_dir="unused", metrics=["entropie"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_the_scalars_and_layout(tmp_path):
    run_monitor(tmp_path / "run")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        tags = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5) as response:
                    tags = json.load(response)
                if tags.get("run", {}).get("topology/fc1/mean_lifetime"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert tags and "topology/fc1/mean_lifetime" in tags["run"]
        with urllib.request.urlopen(f"{base}/data/plugin/custom_scalars/layout", timeout=5) as response:
            layout = json.load(response)
        charts = {category["title"]: [chart["title"] for chart in category["chart"]] for category in layout["category"]}
        assert {"normalized_entropy", "mean_lifetime", "spread", "entropy_deficit", "lr_change_pct"} <= set(charts)
        assert charts["mean_lifetime"] == ["fc1", "fc2", "fc3"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    from topoopt import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "_is_writer_rank", lambda: False)
    model = build_mlp("mlp:12-8-6-3")
    with TopologyMonitor(model, log_dir=tmp_path / "rank1") as monitor:
        monitor.step(0)
        monitor.close(hparams={"a": 1})
    assert not (tmp_path / "rank1").exists()


def test_figures_leave_the_users_matplotlib_backend_alone():
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); import torch; from topoopt.monitor import _figures; "
            "_figures('fc1', torch.rand(5)); print(matplotlib.get_backend())")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "svg"


def test_overflowing_deaths_are_skipped_with_a_reason_not_raised(tmp_path):
    from topoopt import TopologyMonitor
    from topoopt.lab.models import build_mlp

    model = build_mlp("mlp:4-6-2")
    with torch.no_grad():
        model.fc1.weight.copy_(torch.randn(6, 4) * 3e38)  # deaths overflow float32 to inf
    monitor = TopologyMonitor(model, log_dir=tmp_path, diagrams_every=1)
    monitor.step(0)
    monitor.close()
    assert "fc1" in monitor.skipped and "fc2" in monitor.last


def test_signals_that_move_on_a_default_network_and_a_verdict_at_the_end(tmp_path, caplog):
    """On PyTorch's default initialisation the entropy reads ~0.9999; spread (mean lifetime over
    RMS neuron norm) and the entropy deficit are logged beside it, checked here against their
    definitions, and close() writes a verdict that says the entropy was saturated."""
    import logging
    import math

    from topoopt import h0_deaths, mean_lifetime, neuron_cloud, normalized_persistent_entropy

    caplog.set_level(logging.INFO, logger="topoopt")
    model, monitor = run_monitor(tmp_path)
    acc = events(tmp_path)
    cloud = neuron_cloud(model.fc1).detach()
    deaths = h0_deaths(cloud)
    rms = float(cloud.double().pow(2).sum().sqrt()) / math.sqrt(cloud.shape[0])
    assert acc.Scalars("topology/fc1/spread")[-1].value == pytest.approx(float(mean_lifetime(deaths)) / rms, rel=1e-5)
    assert acc.Scalars("topology/fc1/entropy_deficit")[-1].value == pytest.approx(
        1 - float(normalized_persistent_entropy(deaths)), rel=1e-3, abs=1e-7)
    assert "optim/fc1/lr_change_pct" in acc.Tags()["scalars"]
    text = monitor.verdict()
    assert "fc1: spread" in text and "TopoOptimizer" in text
    assert any("topology over steps 0–3" in record.getMessage() for record in caplog.records)
    assert "verdict" in "".join(acc.Tags()["tensors"])


def test_custom_scalars_has_one_chart_per_layer_and_series(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    run_monitor(tmp_path)
    acc = events(tmp_path)
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    categories = {category.title: [chart.title for chart in category.chart] for category in layout.category}
    assert set(categories) == {"normalized_entropy", "mean_lifetime", "spread", "entropy_deficit", "lr_change_pct"}
    assert categories["spread"] == ["fc1", "fc2", "fc3"]


def test_alerts_for_coinciding_and_collapsing_neurons(tmp_path):
    """Copies are reported at once; a layer drawn towards one point (its spread falling tenfold)
    is reported once, as a text entry, a callback and in the verdict."""
    model = build_mlp("mlp:12-8-6-3")
    with torch.no_grad():
        model.fc2.weight[3:].copy_(model.fc2.weight[:3])  # 3 copies
    seen = []
    with TopologyMonitor(model, log_dir=tmp_path, on_alert=seen.append) as monitor:
        centre = model.fc1.weight.detach().mean(dim=0, keepdim=True)
        for step in range(6):
            with torch.no_grad():  # fc1's neurons drawn towards their centre, 2.5× closer per step
                model.fc1.weight.copy_(centre + (model.fc1.weight - centre) / 2.5)
            monitor.step(step)
        text = monitor.verdict()
    kinds = [(alert.kind, alert.layer) for alert in seen]
    assert ("coincident", "fc2") in kinds and kinds.count(("collapse", "fc1")) == 1
    assert ("coincident", "fc1") not in kinds and ("collapse", "fc2") not in kinds
    assert "3 of its 6 neurons duplicate another" in text and "layer fc1 is collapsing" in text
    assert {"alerts/fc1", "alerts/fc2"} <= {t.split("/text_summary")[0] for t in events(tmp_path).Tags()["tensors"]}


def _hparams(log_dir) -> dict:
    """The hparams of the session written into `log_dir`, read back from the event file."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = events(log_dir)
    metadata = acc.SummaryMetadata("_hparams_/session_start_info")
    info = plugin_data_pb2.HParamsPluginData.FromString(metadata.plugin_data.content).session_start_info
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for key, value in info.hparams.items()}


def test_the_with_form_writes_an_hparams_entry_with_or_without_settings(tmp_path):
    model = build_mlp("mlp:12-8-6-3")
    with TopologyMonitor(model, log_dir=tmp_path / "own", every=1) as monitor:
        monitor.step(0)
    assert _hparams(tmp_path / "own") == {"monitor_every": 1.0, "layers": 3.0, "signals": "True",
                                          "topo_optimizer": "False"}
    with TopologyMonitor(model, log_dir=tmp_path / "set", every=1) as monitor:
        monitor.hparams, monitor.final = {"lr": 0.1, "arch": "mlp"}, {"accuracy": 0.9}
        monitor.step(0)
    assert _hparams(tmp_path / "set") == {"lr": 0.1, "arch": "mlp"}
    # The final metrics are one scalar each; the topology metrics are read from their own series,
    # not copied into one-point charts.
    scalars = set(events(tmp_path / "set").Tags()["scalars"])
    assert "hparam/accuracy" in scalars and not any(t.startswith("hparam/topology") for t in scalars)
    from tensorboard.plugins.hparams import plugin_data_pb2

    experiment = events(tmp_path / "set").SummaryMetadata("_hparams_/experiment")
    names = {m.name.tag for m in plugin_data_pb2.HParamsPluginData.FromString(
        experiment.plugin_data.content).experiment.metric_infos}
    assert {"hparam/accuracy", "topology/fc1/spread"} <= names


def test_a_layer_that_stops_moving_is_reported_once_as_still(tmp_path):
    """A frozen layer (its weights the same for two measurements) raises one still alert, which
    re-arms when the layer moves again; a training layer raises none."""
    model = build_mlp("mlp:12-8-6-3")
    model.fc1.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    seen = []
    with TopologyMonitor(model, log_dir=tmp_path, on_alert=seen.append) as monitor:
        for step in range(8):
            if step == 5:
                with torch.no_grad():
                    model.fc1.weight.mul_(1.01)  # moved once: the alert re-arms
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            monitor.step(step)
    still = [(alert.layer, alert.step) for alert in seen if alert.kind == "still"]
    assert still == [("fc1", 2), ("fc1", 7)]
    assert "has not changed for 2 measurements: it is frozen, or no gradient reaches it" in seen[0].message


def test_an_optimizer_that_scales_nothing_is_said_once_and_a_non_optimizer_refused(tmp_path):
    model = build_mlp("mlp:12-8-6-3")
    with pytest.warns(UserWarning, match="the optimizer is an SGD, not a TopoOptimizer: .*no lr_scale"):
        monitor = TopologyMonitor(model, log_dir=tmp_path / "a", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert monitor.optimizer is None
    monitor.close()
    with pytest.raises(TypeError, match="Invalid optimizer: a str. It must be a TopoOptimizer"):
        TopologyMonitor(model, log_dir=tmp_path / "b", optimizer="x")
    wrapped = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)

    class FrameworkWrapper(torch.optim.Optimizer):  # as accelerate's AcceleratedOptimizer holds its optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    with TopologyMonitor(model, log_dir=tmp_path / "c", optimizer=FrameworkWrapper(wrapped)) as monitor:
        assert monitor.optimizer is wrapped
