"""The sweeps' progress line when the output is not a terminal (topoopt.lab.sweep.run_cells)."""

import io

from topoopt.lab import progress, sweep


def test_progress_line_counts_the_cells_done_when_the_bar_is_off(tmp_path, monkeypatch):
    stream = io.StringIO()  # not a terminal: the bar is off, the heartbeat prints
    monkeypatch.setattr(progress.sys, "stdout", stream)
    monkeypatch.setattr(sweep, "Heartbeat", lambda enabled: progress.Heartbeat(enabled, interval=0.0, stream=stream))
    results = tmp_path / "runs.jsonl"
    sweep.run_cells([{"id": "a"}], lambda cell: {"x": 1}, results, desc="study")  # one done before
    sweep.run_cells([{"id": c} for c in "abc"], lambda cell: {"x": 1}, results, desc="study")
    assert stream.getvalue().splitlines()[-2:] == ["study: 2 of 3 cells done", "study: 3 of 3 cells done"]
