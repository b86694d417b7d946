"""`phalanx report`: failure and recovery marks on the curves, the recovery table, the PNG.

The run folders are written here line by line in the formats the trainer (`metrics.jsonl`, `restore`,
`resume`, `first_step`), the fault injector (`fault_injected`) and the Ray controller (`failure`,
`recovery`, `gave_up`) write, so each case is exact and needs no Ray cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phalanx.cli import main
from phalanx.events import read_jsonl
from phalanx.report import Mark, marks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_800_000_000.0


def metric(step: int) -> dict:
    """A `Trainer._metrics` record."""
    return {"step": step, "loss": 5.0 - 0.2 * step, "grad_norm": 1.0, "lr": 3e-3, "step_seconds": 0.2,
            "tokens_per_s": 10_000.0 + 100 * step, "tokens_per_s_per_device": 5_000.0 + 50 * step, "mfu": None,
            "memory_gib": 0.5}


def failure(at: float, cause: str, ranks: list[int], nodes: list[int], detail: str = "") -> dict:
    return {"time": at + 0.01, "event": "failure", "cause": cause, "ranks": ranks, "nodes": nodes,
            "failed_at": at - 0.5, "detected_at": at, "detail": detail}


def recovery(of: dict, at: float, step: int, lost: int, source: str, split: tuple[float, float, float, float]) -> dict:
    detect, restart, restore, first = split
    return {"time": at, "event": "recovery", "cause": of["cause"], "ranks": of["ranks"], "nodes": of["nodes"],
            "detail": of["detail"], "failed_at": of["failed_at"], "detected_at": of["detected_at"],
            "restored_from": source, "step": step, "steps_lost": lost, "detect_s": detect, "restart_s": restart,
            "restore_s": restore, "first_step_s": first, "downtime_s": detect + restart + restore + first}


def relaunch(at: float, step: int, source: str) -> list[dict]:
    """What the trainers of a relaunched attempt write: restore, resume, first step."""
    return [{"time": at, "event": "restore", "step": step, "restored_from": source, "reason": "test", "seconds": 0.03},
            {"time": at + 0.01, "event": "resume", "step": step, "world_size": 4},
            {"time": at + 0.2, "event": "first_step", "step": step + 1}]


def two_recoveries() -> list[dict]:
    """A kill of rank 1 after step 3 (nothing lost), then node 1 lost after step 6 (rebuilt at step 5)."""
    killed = failure(T0 + 10, "dead worker", [1], [0])
    lost = failure(T0 + 30, "lost node", [2, 3], [1], "its keeper is gone")
    return [
        {"time": T0, "event": "workers", "attempt": 0, "nodes": [0, 0, 1, 1], "node_ids": ["a", "a", "b", "b"]},
        {"time": T0 + 1, "event": "start", "step": 0, "world_size": 4},
        {"time": T0 + 1.2, "event": "first_step", "step": 1},
        {"time": T0 + 9.6, "event": "fault_injected", "spec": "kill:rank=1:step=3", "kind": "kill", "rank": 1,
         "step": 3},
        killed,
        {"time": T0 + 10.1, "event": "workers", "attempt": 1, "nodes": [0, 0, 1, 1], "node_ids": ["a", "a", "b", "b"]},
        *relaunch(T0 + 13, 3, "keeper"),
        recovery(killed, T0 + 13.3, 3, 0, "keeper", (0.4, 2.9, 0.03, 0.2)),
        {"time": T0 + 29.5, "event": "fault_injected", "spec": "node:node=1:step=6", "kind": "node", "node": 1,
         "step": 6},
        lost,
        *relaunch(T0 + 36, 5, "peers"),
        recovery(lost, T0 + 36.4, 5, 1, "peers", (1.1, 5.2, 0.4, 0.3)),
        {"time": T0 + 40, "event": "end", "step": 10},
    ]


def write_run(root: Path, events: list[dict], steps: range) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(metric(s)) + "\n" for s in steps))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def colour_pixels(png: Path, rgb: tuple[int, int, int]) -> int:
    """How many pixels of the PNG are within a few levels of `rgb` (matplotlib's antialiasing blurs edges)."""
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[..., :3] * 255
    return int((abs(pixels - rgb).max(axis=-1) < 8).sum())


TAB_RED, TAB_GREEN = (214, 39, 40), (44, 160, 44)


def test_marks_put_faults_failures_and_resumptions_at_their_steps():
    assert marks(two_recoveries()) == [
        Mark(3, "fault", "kill rank 1"),
        Mark(3, "failure", "dead worker (rank 1)"),
        Mark(3, "recovered", "from keeper, 3.5s down"),
        Mark(6, "fault", "node 1 lost"),
        Mark(6, "failure", "lost node (rank 2,3)"),  # restored step 5 + 1 step lost: it had reached step 6
        Mark(5, "recovered", "from peers, 7.0s down"),
    ]  # the trainers' `resume` events inside a recovery are not marked again


def test_a_failure_is_marked_at_the_newest_step_any_event_saw_before_it():
    """A kill right after step 8, before the controller's next heartbeat: it counted 0 steps lost from step 7."""
    killed = failure(T0 + 10, "dead worker", [1], [0])
    events = [{"time": T0 + 9.9, "event": "fault_injected", "spec": "kill:rank=1:step=8", "kind": "kill", "rank": 1,
               "step": 8}, killed, *relaunch(T0 + 12, 7, "keeper"),
              recovery(killed, T0 + 12.3, 7, 0, "keeper", (0.5, 1.5, 0.03, 0.2))]
    assert [(m.step, m.kind) for m in marks(events)] == [(8, "fault"), (8, "failure"), (7, "recovered")]


def test_a_failure_during_a_recovery_is_shown_as_interrupting_it(tmp_path, capsys):
    """Rank 1 killed after step 3; rank 0 killed while it restored step 3; the second recovery succeeds."""
    first = failure(T0 + 10, "dead worker", [1], [0])
    second = failure(T0 + 14, "dead worker", [0], [0])
    events = [{"time": T0 + 9.8, "event": "fault_injected", "spec": "kill:rank=1:step=3", "kind": "kill", "rank": 1,
               "step": 3}, first,
              {"time": T0 + 10.2, "event": "workers", "attempt": 1, "nodes": [0, 0], "node_ids": ["a", "a"]},
              {"time": T0 + 13.5, "event": "fault_injected", "spec": "kill_restoring:rank=0:step=2",
               "kind": "kill_restoring", "rank": 0, "step": 3}, second,
              {"time": T0 + 14.2, "event": "workers", "attempt": 2, "nodes": [0, 0], "node_ids": ["a", "a"]},
              *relaunch(T0 + 17, 3, "keeper"), recovery(second, T0 + 17.3, 3, 0, "keeper", (0.3, 2.5, 0.03, 0.2))]
    assert marks(events) == [
        Mark(3, "fault", "kill rank 1"),
        Mark(3, "failure", "dead worker (rank 1), recovery interrupted by the next failure"),
        Mark(3, "fault", "kill_restoring rank 0"),
        Mark(3, "failure", "dead worker (rank 0)"),
        Mark(3, "recovered", "from keeper, 3.0s down"),
    ]
    run = write_run(tmp_path, events, range(1, 7))
    assert main(["report", str(run)]) == 0
    rows = [[c.strip() for c in line.split("|")] for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith("dead worker")]
    assert [row[:4] for row in rows] == [["dead worker", "1", "0", "recovery interrupted by the next failure"],
                                         ["dead worker", "0", "0", "keeper"]]


def test_report_prints_the_recovery_table_and_draws_the_marks(tmp_path, capsys):
    run = write_run(tmp_path, two_recoveries(), range(1, 11))
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("cause"))
    cells = lambda line: [c.strip() for c in line.split("|")]  # noqa: E731
    assert cells(lines[header]) == ["cause", "ranks", "nodes", "restored from", "step", "steps lost", "downtime s",
                                    "detect s", "restart s", "restore s", "first step s"]
    assert cells(lines[header + 2]) == ["dead worker", "1", "0", "keeper", "3", "0", "3.53", "0.40", "2.90", "0.03",
                                        "0.20"]
    assert cells(lines[header + 3]) == ["lost node", "2,3", "1", "peers", "5", "1", "7.00", "1.10", "5.20", "0.40",
                                        "0.30"]
    assert lines[header - 1] == "recoveries: 2"
    assert "resumes 2; failures 2" in out and "10 steps logged" in out
    png = run / "loss.png"
    assert f"plot: {png}" in out
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert colour_pixels(png, TAB_RED) > 100, "no failure line drawn"  # two lines on each of two plots
    assert colour_pixels(png, TAB_GREEN) > 0, "no recovery line drawn"


def test_a_clean_run_has_no_marks_and_says_so(tmp_path, capsys):
    events = [{"time": T0, "event": "start", "step": 0, "world_size": 1}, {"time": T0 + 1, "event": "end", "step": 5}]
    run = write_run(tmp_path, events, range(1, 6))
    assert main(["report", str(run)]) == 0
    assert "recoveries: none" in capsys.readouterr().out
    assert marks(read_jsonl(str(run / "events.jsonl"))) == []
    assert colour_pixels(run / "loss.png", TAB_RED) == 0 and colour_pixels(run / "loss.png", TAB_GREEN) == 0


def test_a_failure_never_recovered_is_marked_and_tabled_with_the_controllers_last_word(tmp_path, capsys):
    hung = failure(T0 + 20, "hang", [1], [0], "ranks [0] waited in all_reduce #41 longer than 6s")
    gave_up = {"time": T0 + 21, "event": "gave_up", "restarts": 1,
               "message": "giving up after fault.max_restarts=1 recoveries (last: hang); the newest usable "
                          "checkpoint is runs/t/checkpoints/step-5"}
    events = [{"time": T0, "event": "start", "step": 0, "world_size": 2},
              {"time": T0 + 15, "event": "checkpoint", "step": 5, "path": "runs/t/checkpoints/step-5", "seconds": 0.1},
              {"time": T0 + 18, "event": "fault_injected", "spec": "hang:rank=1:step=7", "kind": "hang", "rank": 1,
               "step": 7}, hung, gave_up]
    run = write_run(tmp_path, events, range(1, 8))
    assert marks(events) == [Mark(7, "fault", "hang rank 1"), Mark(7, "failure", "hang (rank 1), not recovered")]
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("hang"))
    assert [c.strip() for c in row.split("|")][:4] == ["hang", "1", "0", "not recovered"]
    assert "gave up: giving up after fault.max_restarts=1" in out and "step-5" in out


def test_a_plain_relaunch_and_a_stop_are_marked(tmp_path):
    events = [{"time": T0, "event": "start", "step": 0, "world_size": 1},
              {"time": T0 + 5, "event": "interrupted", "step": 4, "signal": "SIGTERM"},
              {"time": T0 + 60, "event": "restore", "step": 4, "restored_from": "storage", "reason": "", "seconds": 0.1},
              {"time": T0 + 60.1, "event": "resume", "step": 4, "world_size": 1}]
    assert marks(events) == [Mark(4, "interrupted", "stopped"), Mark(4, "resumed", "resumed at step 4")]


@pytest.mark.parametrize("content", ["", "\n"])
def test_report_without_steps_is_a_user_error_naming_the_folder(tmp_path, capsys, content):
    (tmp_path / "metrics.jsonl").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "no metrics.jsonl with steps" in err


def test_torn_and_foreign_lines_are_skipped_with_one_warning_naming_the_file(tmp_path, capsys):
    """A SIGKILL mid-write leaves a torn last line; a shared run folder may hold anything. `report` reads
    what it can, warns once per file, and never holds more than one bounded line of a huge one."""
    events = [{"time": T0, "event": "start", "step": 0, "world_size": 1}, {"time": T0 + 1, "event": "end", "step": 5}]
    run = write_run(tmp_path, events, range(1, 6))
    with open(run / "events.jsonl", "a") as f:
        f.write('{"time": 1, "event": "fail\n[1, 2]\n{"event": "no time"}\n' + "x" * (3 << 20) + "\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": "six"}\n{"step": 6, "loss": 1.0, "lr": 0.001, "tok')
    with pytest.warns(RuntimeWarning) as caught:
        assert main(["report", str(run)]) == 0
    said = [str(w.message) for w in caught]
    assert any("events.jsonl: skipped line 3, 4, 6" in s for s in said), said
    assert any("metrics.jsonl: skipped line 7" in s for s in said), said
    assert "recoveries: none" in capsys.readouterr().out


def test_an_elastic_shrink_and_growth_are_marked_and_on_the_controllers_timeline(tmp_path):
    """A node lost with no spare (4 -> 2 workers, resharded from memory at step 6), then room again (-> 4)."""
    from phalanx.launch.timeline import timeline

    lost = failure(T0 + 10, "lost node", [2, 3], [1], "the node left the cluster")
    grow = failure(T0 + 30, "grow", [], [], "Ray has room for --workers=4 again")

    def resize(of: dict, at: float, step: int, sizes: tuple[int, int], layouts: tuple[str, str]) -> dict:
        return {**recovery(of, at, step, 0, "keeper (resharded)", (0.2, 4.0, 0.1, 0.1)), "event": "resize",
                "from_workers": sizes[0], "to_workers": sizes[1], "from_layout": layouts[0], "to_layout": layouts[1],
                "replan_s": 1.0}

    events = [lost, *relaunch(T0 + 14, 6, "keeper (resharded)"),
              recovery(lost, T0 + 14.3, 6, 0, "keeper (resharded)", (0.2, 4.0, 0.1, 0.1)),
              resize(lost, T0 + 14.3, 6, (4, 2), ("dp4 ddp mb1", "dp2 ddp mb2")),
              grow, *relaunch(T0 + 34, 9, "keeper (resharded)"),
              recovery(grow, T0 + 34.3, 9, 0, "keeper (resharded)", (0.0, 4.0, 0.1, 0.1)),
              resize(grow, T0 + 34.3, 9, (2, 4), ("dp2 ddp mb2", "dp4 ddp mb1"))]
    assert [(m.step, m.kind, m.label) for m in marks(events) if m.kind in ("failure", "resized")] == [
        (6, "failure", "lost node (rank 2,3)"), (6, "resized", "4 -> 2 workers (dp2 ddp mb2)"),
        (9, "failure", "grow: Ray has room for --workers=4 again"), (9, "resized", "2 -> 4 workers (dp4 ddp mb1)")]
    run = write_run(tmp_path, events, range(1, 12))
    lines = timeline(str(run), T0)
    assert "resized (lost node): 4 workers (dp4 ddp mb1) -> 2 (dp2 ddp mb2), from keeper (resharded) at step 6, " \
           "replan 1.00s" in lines[3], lines
