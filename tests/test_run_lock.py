"""One run per folder: of runs started together into one folder exactly one proceeds, a killed
run's claim is taken over, and a start that fails leaves no folder behind."""

import multiprocessing
import os
import subprocess
import sys

import pytest

from topoopt.lab.cli import main
from topoopt.lab.run_lock import LOCK_FILE, RunFolderBusy, run_lock

ROUNDS = 10


def _contend(folder, barrier, results):
    barrier.wait()
    try:
        with run_lock(folder):
            results.put("ran")
            barrier.wait()  # both have tried before either releases
    except RunFolderBusy:
        results.put("refused")
        barrier.wait()


def test_of_two_runs_started_together_exactly_one_proceeds(tmp_path):
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    for round_ in range(ROUNDS):
        folder = tmp_path / f"run{round_}"
        barrier, results = context.Barrier(2), context.Queue()
        workers = [context.Process(target=_contend, args=(folder, barrier, results)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        assert sorted(results.get(timeout=5) for _ in range(2)) == ["ran", "refused"]
        assert not folder.exists()  # the winner left nothing in it, so it was removed


def test_a_killed_runs_claim_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "run"
    folder.mkdir()
    import socket

    (folder / LOCK_FILE).write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    with run_lock(folder):
        assert (folder / LOCK_FILE).read_text().split()[0] == str(os.getpid())


def test_a_live_claim_refuses_a_second_train_in_one_line(tmp_path, capsys):
    folder = tmp_path / "run"
    with run_lock(folder):
        status = main(["train", "--dataset", "digits", "--epochs", "1", "--quiet", "--log-dir", str(folder)])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another topoopt run (process" in err and "--log-dir" in err


def test_a_failed_start_leaves_no_folder(tmp_path):
    folder = tmp_path / "new"
    with pytest.raises(ValueError):
        with run_lock(folder):
            raise ValueError("a bad option")
    assert not folder.exists()


def test_a_folder_found_empty_is_removed_if_the_run_left_nothing_in_it(tmp_path):
    """As when a rival start created the folder and was refused: the winner, which found it
    empty, removes it; a folder holding anything else stays."""
    empty, kept = tmp_path / "empty", tmp_path / "kept"
    empty.mkdir()
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for folder in (empty, kept):
        with run_lock(folder):
            pass
    assert not empty.exists() and (kept / "notes.txt").read_text() == "mine"
