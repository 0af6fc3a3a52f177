"""Bad input on the command line: one line naming the option or file, exit status 2, no traceback,
and nothing left behind that blocks the corrected rerun (issue #16)."""

import gzip
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from topoopt.lab.cli import main
from topoopt.lab.data import DatasetUnavailable, load_dataset, stratified_subset
from topoopt.lab.progress import Heartbeat
from topoopt.lab.sweep import load_results, run_cells

TINY = ["train", "--dataset", "digits", "--model", "mlp:64-16-10", "--epochs", "1", "--batch-size", "128",
        "--quiet", "--monitor-every", "2", "--diagrams-every", "5"]


def run_cli(argv: list[str]) -> int:
    """main()'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def one_line(err: str) -> str:
    err = err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_each_dataset_default_model_fits(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--quiet",
                 "--log-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["model"] == "mlp:64-100-100-10"


@pytest.mark.parametrize("extra,option", [
    (["--topo-optimizer", "calm", "--topo-strength", "-1"], "--topo-strength"),
    (["--topo-optimizer", "calm", "--topo-bounds", "2", "3"], "--topo-bounds"),
    (["--momentum", "-0.5"], "--momentum"),
    (["--momentum", "nan"], "--momentum"),
    (["--momentum", "1.5"], "--momentum"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum"),
    (["--penalty", "mean_lifetime", "--penalty-weight", "nan"], "--penalty-weight"),
    (["--init", "normal", "--init-std", "-1"], "--init-std"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "abc"], "--lr"),
    (["--subset", "1340"], "--subset"),
    (["--subset", "1346"], "--subset"),
    (["--epochs", "0"], "--epochs"),
    (["--model", "mlp:64-100000000-10"], "--model"),
    (["--seed", str(2**70)], "--seed"),
    (["--seed", "-1"], "--seed"),
])
def test_bad_option_is_one_line_and_leaves_no_run_folder(tmp_path, capsys, extra, option):
    run = tmp_path / "run"
    assert run_cli(TINY + extra + ["--log-dir", str(run)]) == 2
    assert option in one_line(capsys.readouterr().err)
    assert not run.exists()


def test_corrected_rerun_after_a_bad_option_works(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(TINY + ["--topo-optimizer", "calm", "--topo-bounds", "2", "3", "--log-dir", str(run)]) == 2
    assert main(TINY + ["--topo-optimizer", "calm", "--topo-bounds", "0.5", "2", "--log-dir", str(run)]) == 0


def test_subset_range_in_the_message_is_true():
    digits = load_dataset("digits")
    n, classes = len(digits.y_train), digits.n_classes
    assert len(stratified_subset(digits, n - classes).y_train) == n - classes
    assert len(stratified_subset(digits, n).y_train) == n
    with pytest.raises(ValueError, match=rf"\[{classes}, {n - classes}\], or {n}"):
        stratified_subset(digits, n - classes + 1)


@pytest.mark.parametrize("argv,option", [(["sparse", "--jobs", "0"], "--jobs"), (["sparse", "--seeds", "0"], "--seeds"),
                                         (["ablate", "--jobs", "-1"], "--jobs"),
                                         (["small-data", "--seeds", "0"], "--seeds"),
                                         (["learning-graphs", "--epochs", "0"], "--epochs"),
                                         (["learning-graphs", "--lr", "nan"], "--lr")])
def test_study_options_are_checked(argv, option, capsys):
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err


# ---- --log-dir that cannot be used ----
def test_log_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert run_cli(TINY + ["--log-dir", str(target)]) == 2
    assert "--log-dir" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_log_dir_that_cannot_be_created(tmp_path, capsys, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "run"
    else:
        target = "/proc/topoopt-run"
    assert run_cli(TINY + ["--log-dir", str(target)]) == 2
    assert "--log-dir" in one_line(capsys.readouterr().err)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_log_dir_in_a_read_only_folder(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert run_cli(TINY + ["--log-dir", str(parent / "run")]) == 2
        assert "--log-dir" in one_line(capsys.readouterr().err)
    finally:
        parent.chmod(0o700)


def test_diverging_training_stops_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(TINY + ["--lr", "1e30", "--log-dir", str(run)]) == 2
    assert "diverged" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("bad,named", [(["--lr", "1e30"], "--lr 1e+30"),
                                       (["--init", "normal", "--init-std", "1e30"], "--init-std 1e+30")])
def test_a_start_that_diverges_names_its_cause_and_leaves_nothing_blocking_the_rerun(tmp_path, capsys, bad, named):
    run = tmp_path / "run"
    assert run_cli(TINY + bad + ["--log-dir", str(run)]) == 2
    err = one_line(capsys.readouterr().err)
    assert named in err and "no checkpoint was written" in err and "last good checkpoint" not in err
    assert not run.exists() or not any(run.iterdir())
    assert run_cli(TINY + ["--log-dir", str(run)]) == 0  # the corrected command just works


# ---- damaged checkpoints ----
def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "random":
        path.write_bytes(random.Random(0).randbytes(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    else:  # 20 flipped bytes in the stored tensors
        rng = random.Random(1)
        for index in rng.sample(range(len(data) // 4, len(data) * 3 // 4), 20):
            data[index] ^= 0xFF
        path.write_bytes(bytes(data))


def _epochs(n: int) -> list[str]:
    return TINY[:6] + [str(n)] + TINY[7:-4] + ["--monitor-every", "100", "--diagrams-every", "1000"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-epoch run (two checkpoints kept) and the weights of the same run after 3 epochs."""
    root = tmp_path_factory.mktemp("runs")
    assert main(_epochs(3) + ["--log-dir", str(root / "straight")]) == 0
    assert main(_epochs(2) + ["--log-dir", str(root / "two")]) == 0
    assert (root / "two" / "checkpoint.prev.pt").exists()  # epoch 1's, kept beside epoch 2's
    return root


@pytest.mark.parametrize("how", ["truncated", "random", "empty", "flipped"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(runs, tmp_path, capsys, how):
    run = tmp_path / "run"
    shutil.copytree(runs / "two", run)
    _damage(run / "checkpoint.pt", how)
    assert main(_epochs(3) + ["--log-dir", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint.pt is damaged" in err and "weights_only" not in err
    assert (run / "checkpoint.pt.damaged").exists()
    a = torch.load(runs / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # epoch 2 redone from epoch 1's checkpoint


@pytest.mark.parametrize("field,value,named", [("epoch", "two", "'epoch' is 'two', not an integer"),
                                               ("epoch", -5, "'epoch' is -5, not an integer ≥ 0"),
                                               ("epoch", 10**6, "'epoch' is 1000000 but 'rows' holds 2"),
                                               ("rows", 5, "'rows' is 5, not a list"),
                                               ("seconds", "abc", "'seconds' is 'abc', not a finite number")])
def test_a_checkpoint_with_impossible_fields_is_damaged_and_the_previous_one_used(runs, tmp_path, capsys, field,
                                                                                  value, named):
    """Valid checksums, impossible contents (edited by hand): one line naming the field and the
    file, then the previous checkpoint, as for a corrupt one."""
    run = tmp_path / "run"
    shutil.copytree(runs / "two", run)
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    payload[field] = value
    torch.save(payload, run / "checkpoint.pt")
    assert main(_epochs(3) + ["--log-dir", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint.pt'} is damaged" in err and named in err
    a = torch.load(runs / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["truncated", "random", "empty", "flipped"])
def test_damaged_checkpoint_without_a_previous_one_is_refused(runs, tmp_path, capsys, how):
    run = tmp_path / "run"
    shutil.copytree(runs / "two", run)
    (run / "checkpoint.prev.pt").unlink()
    _damage(run / "checkpoint.pt", how)
    damaged = (run / "checkpoint.pt").read_bytes()
    assert run_cli(_epochs(3) + ["--log-dir", str(run), "--resume"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "checkpoint.pt is damaged" in err and "weights_only" not in err
    assert (run / "checkpoint.pt").read_bytes() == damaged  # kept as it was


def test_stale_temporary_checkpoint_is_removed(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "two", run)
    (run / "checkpoint.tmp").write_bytes(b"half a checkpoint")
    assert main(_epochs(2) + ["--log-dir", str(run), "--resume"]) == 0
    assert not (run / "checkpoint.tmp").exists()


# ---- damaged Fashion-MNIST files ----
def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder, n_train=30, n_test=20, labels_train=None):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(labels_train or n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for stem, array in arrays.items():
        (folder / f"{stem}.gz").write_bytes(gzip.compress(_idx(array)))


def test_fashion_mnist_files_are_read(tmp_path):
    _write_fashion(tmp_path)
    data = load_dataset("fashion-mnist", tmp_path)
    assert data.x_train.shape == (30, 784) and len(data.y_test) == 20


@pytest.mark.parametrize("how", ["truncated_gzip", "random_bytes", "empty", "short_payload", "label_count"])
def test_damaged_fashion_mnist_file_is_one_line(tmp_path, capsys, how):
    folder = tmp_path / "data"
    _write_fashion(folder, labels_train=29 if how == "label_count" else None)
    images = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if how == "truncated_gzip":
        images.write_bytes(images.read_bytes()[:100])
    elif how == "random_bytes":
        images.write_bytes(random.Random(0).randbytes(500))
    elif how == "empty":
        images.write_bytes(b"")
    elif how == "short_payload":
        images.write_bytes(gzip.compress(raw[:-50]))
    with pytest.raises(DatasetUnavailable):
        load_dataset("fashion-mnist", folder)
    run = tmp_path / "run"
    assert run_cli(["train", "--dataset", "fashion-mnist", "--data-dir", str(folder), "--model", "mlp:784-8-10",
                    "--epochs", "1", "--quiet", "--log-dir", str(run)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "train-images-idx3-ubyte.gz" in err or "train-labels-idx1-ubyte.gz" in err
    assert not run.exists()


# ---- sweeps and progress lines ----
def _square(cell):
    return {"value": cell["x"] ** 2}


def test_sweep_results_with_a_non_utf8_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b'{"id": "a", "value": 0}\n\xff\xfe not text\n{"id": "b", "value": 1}\n')
    assert set(load_results(path)) == {"a", "b"}
    results = run_cells([{"id": k, "x": i} for i, k in enumerate("abc")], _square, path, progress=False)
    assert [r["value"] for r in results] == [0, 1, 4]


class _Stream:
    def __init__(self, terminal: bool) -> None:
        self.terminal, self.text = terminal, ""

    def isatty(self) -> bool:
        return self.terminal

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_heartbeat_prints_only_when_not_a_terminal():
    log, terminal = _Stream(False), _Stream(True)
    for stream in (log, terminal):
        beat = Heartbeat(interval=0.0, stream=stream)
        beat.beat(lambda: "step 5")
    assert log.text == "step 5\n" and terminal.text == ""
    quiet = _Stream(False)
    Heartbeat(enabled=False, interval=0.0, stream=quiet).beat(lambda: "x")
    assert quiet.text == ""


def test_ticker_prints_during_a_long_call_only_when_not_a_terminal():
    import time

    from topoopt.lab.progress import Ticker

    log, terminal = _Stream(False), _Stream(True)
    for stream in (log, terminal):
        with Ticker(lambda: "still working", interval=0.01, stream=stream):
            time.sleep(0.1)
    assert log.text.startswith("still working\n") and terminal.text == ""


def test_an_idx_file_of_no_images_is_named(tmp_path, capsys):
    folder = tmp_path / "data"
    _write_fashion(folder)
    images = folder / "train-images-idx3-ubyte.gz"
    with gzip.open(images, "wb") as handle:
        handle.write(b"\x00\x00\x08\x03" + (0).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big"))
    with pytest.raises(DatasetUnavailable, match=r"train-images-idx3-ubyte.gz: holds no examples"):
        load_dataset("fashion-mnist", str(folder))


def test_a_full_disk_under_tensorboards_writer_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """ENOSPC raised in TensorBoard's writer thread (simulated: mounting a tiny tmpfs needs root):
    no thread traceback, one line naming the error, and the corrected rerun resumes."""
    import errno

    from tensorboard.summary.writer import record_writer

    real_write = record_writer.RecordWriter.write
    writes = {"n": 0}

    def filling_disk(self, data):
        writes["n"] += 1
        if writes["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", filling_disk)
    run = tmp_path / "run"
    assert run_cli(TINY + ["--epochs", "3", "--log-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device; free some space" in err and "Traceback" not in err
    monkeypatch.setattr(record_writer.RecordWriter, "write", real_write)  # space freed
    assert run_cli(TINY + ["--epochs", "3", "--log-dir", str(run), "--resume"]) == 0


def test_only_tensorboards_writer_errors_are_kept_quiet():
    """An OSError of TensorBoard's writer thread is kept for the command's one line; any other
    thread's error is printed by Python's usual hook, not swallowed."""
    import threading

    from topoopt.lab.writer_errors import WRITER_THREAD, caught_writer_errors

    printed = []
    saved = threading.excepthook
    threading.excepthook = lambda args: printed.append(type(args.exc_value).__name__)
    try:
        writer_class = type(WRITER_THREAD, (threading.Thread,), {})
        with caught_writer_errors() as caught:
            for cls in (writer_class, threading.Thread):
                thread = cls(target=lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
                thread.start()
                thread.join()
    finally:
        threading.excepthook = saved
    assert [str(error) for error in caught] == ["[Errno 28] No space left on device"]
    assert printed == ["OSError"]  # the other thread's error went to the usual hook
