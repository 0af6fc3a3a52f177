"""TopoOptimizer inside the frameworks people train with: Lightning (automatic and manual
optimization), accelerate, skorch (with sklearn's clone) and pytorch-ignite."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from topoopt import TopoOptimizer
from topoopt.lab.models import build_mlp

pl = pytest.importorskip("lightning.pytorch", reason="test extra: pip install -e '.[test]'")


def data(n=64, features=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, x[:, :classes].argmax(dim=1)


def loader(batch_size=16):
    x, y = data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def trainer(tmp_path, **kwargs):
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


class AutoModule(pl.LightningModule):
    def __init__(self, policy="contrast"):
        super().__init__()
        torch.manual_seed(0)
        self.net = build_mlp("mlp:6-12-8-3")
        self.policy = policy

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        inner = torch.optim.AdamW(self.parameters(), lr=0.01)
        optimizer = TopoOptimizer(inner, self.net, metric="mean_lifetime", policy=self.policy, strength=1.0, every=2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_lightning_automatic_optimization_with_clipping_accumulation_and_exact_resume(tmp_path):
    options = dict(gradient_clip_val=0.5, accumulate_grad_batches=2, precision="bf16-mixed")
    straight = AutoModule()
    trainer(tmp_path / "a", max_epochs=4, **options).fit(straight, loader())
    first = AutoModule()
    run = trainer(tmp_path / "b", max_epochs=2, **options)
    run.fit(first, loader())
    run.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = AutoModule()
    trainer(tmp_path / "c", max_epochs=4, **options).fit(resumed, loader(), ckpt_path=tmp_path / "mid.ckpt")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    optimizer = resumed.trainer.optimizers[0]
    assert optimizer.topo_step == 8 and any(s != 1.0 for s in optimizer.scales.values())


def test_lightning_learning_rate_monitor_logs_each_rate_once(tmp_path):
    """LearningRateMonitor names a scheduler's optimizer, then unwraps any `.optimizer` attribute of
    the trainer's optimizers (DeepSpeed's): the wrapper must not offer one, or every rate is logged
    twice (under TopoOptimizer and under the inner AdamW)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    logged = {}

    class Recorder(pl.loggers.logger.Logger):
        name, version, experiment = "recorder", 0, None

        def log_metrics(self, metrics, step=None):
            logged.update(metrics)

        def log_hyperparams(self, params):
            pass

    run = trainer(tmp_path, max_epochs=1, callbacks=[LearningRateMonitor(logging_interval="step")],
                  log_every_n_steps=1)
    run.loggers = [Recorder()]
    run.fit(AutoModule(), loader())
    rates = sorted(key for key in logged if key.startswith("lr-"))
    assert rates == ["lr-TopoOptimizer"], rates


class ManualModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = build_mlp("mlp:6-12-8-3")
        self.automatic_optimization = False
        self.norms = []

    def training_step(self, batch, _):
        opt = self.optimizers()
        x, y = batch
        self.toggle_optimizer(opt)
        loss = F.cross_entropy(self.net(x), y) * 100  # large gradients, so clipping must act
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.1, gradient_clip_algorithm="norm")
        self.norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()])))
        opt.step()
        self.untoggle_optimizer(opt)
        opt.load_state_dict(opt.state_dict())  # the proxy round-trips the wrapper's own state

    def configure_optimizers(self):
        return TopoOptimizer(torch.optim.AdamW(self.parameters(), lr=0.01), self.net, policy="contrast", every=1)


def test_lightning_manual_optimization_sees_the_groups_and_state(tmp_path):
    module = ManualModule()
    trainer(tmp_path, max_epochs=1).fit(module, loader())
    assert module.norms and max(module.norms) == pytest.approx(0.1, rel=1e-4)
    optimizer = module.trainer.optimizers[0]
    assert optimizer.topo_step == 4 and len(optimizer.state) == len(list(module.parameters()))


def test_accelerate_prepare_save_and_load_state_resume_bit_identically(tmp_path):
    accelerate = pytest.importorskip("accelerate")

    def build():
        torch.manual_seed(0)
        net = build_mlp("mlp:6-12-8-3")
        optimizer = TopoOptimizer(torch.optim.Adam(net.parameters(), lr=0.01), net, policy="contrast", every=2,
                                  metric="mean_lifetime")
        accelerator = accelerate.Accelerator(cpu=True)
        net, optimizer = accelerator.prepare(net, optimizer)
        return accelerator, net, optimizer

    def train(accelerator, net, optimizer, steps, seed0):
        for step in range(steps):
            x, y = data(seed=seed0 + step)
            optimizer.zero_grad()
            accelerator.backward(F.cross_entropy(net(x), y))
            optimizer.step()

    accelerator, straight, optimizer = build()
    train(accelerator, straight, optimizer, 9, 0)
    accelerator, first, optimizer = build()
    train(accelerator, first, optimizer, 4, 0)
    accelerator.save_state(tmp_path / "state")
    accelerator, resumed, optimizer = build()
    accelerator.load_state(tmp_path / "state")
    train(accelerator, resumed, optimizer, 5, 4)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_skorch_takes_the_class_and_keyword_arguments_and_survives_clone():
    skorch = pytest.importorskip("skorch")
    from sklearn.base import clone

    x, y = data(n=96)
    net = skorch.NeuralNetClassifier(
        build_mlp("mlp:6-12-3"), criterion=nn.CrossEntropyLoss, optimizer=TopoOptimizer,
        optimizer__inner=torch.optim.AdamW, optimizer__policy="contrast", optimizer__every=1,
        lr=0.01, max_epochs=3, batch_size=32, train_split=None, verbose=0)
    copy_ = clone(net)
    for model in (net, copy_):
        model.fit(x, y)
        assert isinstance(model.optimizer_, TopoOptimizer)
        # skorch passes unnamed param groups, so layers are named by position: the weights are
        # parameters 0 and 2 of fc1.weight, fc1.bias, fc2.weight, fc2.bias.
        assert model.optimizer_.layer_names == ["param0", "param2"]
        assert model.optimizer_.topo_step == 9
        assert model.optimizer_.param_groups[0]["lr"] == 0.01


def test_ignite_trainer_with_checkpoint(tmp_path):
    ignite = pytest.importorskip("ignite")
    from ignite.engine import Events, create_supervised_trainer
    from ignite.handlers import Checkpoint, DiskSaver

    torch.manual_seed(0)
    net = build_mlp("mlp:6-12-3")
    optimizer = TopoOptimizer(net.named_parameters(), inner=torch.optim.SGD, lr=0.1, policy="contrast", every=1)
    engine = create_supervised_trainer(net, optimizer, nn.CrossEntropyLoss())
    to_save = {"model": net, "optimizer": optimizer}
    engine.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver(tmp_path, require_empty=False)))
    engine.run(loader(), max_epochs=2)
    assert optimizer.topo_step == 8
    saved = torch.load(next(tmp_path.glob("*.pt")), weights_only=True)
    assert saved["optimizer"]["topoopt"]["topo_step"] == 8
    assert ignite.__version__


def test_lightning_topology_callback_logs_into_the_trainers_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from topoopt import layer_topology
    from topoopt.lightning import TopologyCallback

    module = AutoModule()
    callback = TopologyCallback(every=2, metrics="normalized_entropy")
    logger = TensorBoardLogger(tmp_path, name="run")
    run = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=2, logger=logger, callbacks=[callback],
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    run.fit(module, loader())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    entropy = events.Scalars("topology/net/fc1/normalized_entropy")
    assert [e.step for e in entropy] == [2, 4, 6, 8]
    exact = layer_topology(module.net)["fc1"].normalized_entropy
    assert entropy[-1].value == pytest.approx(exact, rel=1e-6)
    # The optimizer names layers after the model it wraps (self.net): "fc1".
    assert [e.step for e in events.Scalars("optim/fc1/lr_scale")] == [2, 4, 6, 8]


def test_lightning_topology_callback_without_tensorboard_says_so(tmp_path):
    from topoopt.lightning import TopologyCallback

    with pytest.raises(ValueError, match="TopologyCallback logs to TensorBoard: give the Trainer a"):
        trainer(tmp_path, max_epochs=1, callbacks=[TopologyCallback()]).fit(AutoModule(), loader())


def test_lightning_topology_early_stopping_stops_once_the_topology_settles(tmp_path):
    from topoopt.lightning import TopologyEarlyStoppingCallback

    module = AutoModule()
    callback = TopologyEarlyStoppingCallback(tolerance=0.5, patience=2)  # generous: settles at once
    trainer(tmp_path, max_epochs=20, callbacks=[callback]).fit(module, loader())
    assert callback.stopped_epoch == 2 and module.trainer.current_epoch == 3
    assert len(callback.stopper.history) == 3
