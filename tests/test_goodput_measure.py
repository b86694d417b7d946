"""Measured effective training time (`phalanx/goodput_measure.py`) on event streams written here line by line in the
formats the trainer, the controller and the fault injector write, so every second of the breakdown is known: a run
with a kill (one step rolled back), a fault that strikes during the next recovery, and the final save."""

from __future__ import annotations

import json

import pytest

from phalanx.goodput_measure import KEYS, ettr_line, ettr_of, measured_ettr, run_terms

T0 = 1_800_000_000.0
STEP = 1.0  # every step's own seconds; each step's interval is 1.25 s (0.25 s of snapshot and logging)


def record(step: int, at: float, seconds: float = STEP) -> dict:
    return {"step": step, "loss": 5.0 - 0.1 * step, "step_seconds": seconds, "tokens_per_s": 1000.0, "time": T0 + at}


def event(at: float, name: str, **fields) -> dict:
    return {"time": T0 + at, "event": name, **fields}


def a_run() -> tuple[list[dict], list[dict]]:
    """Launch at 0; the first launch starts at 10 and trains steps 1-4 (its first step 1.5 s long, 0.5 s more than a
    steady one); rank 1 is killed at 16.0 (step 5 in progress); the failure is detected at 16.5; the restore of step 3
    (step 4 is lost) runs 20.0-20.5; steps 4-5 are trained again; a second kill at 23.0 (step 6 in progress) is
    detected at 23.5, step 5 restored at 25.0-25.4; steps 6-7; the final save ends at 29.0."""
    records = [record(1, 11.5, 1.5), record(2, 12.75), record(3, 14.0), record(4, 15.25),
               record(4, 21.5, 1.0), record(5, 22.75),
               record(6, 26.4), record(7, 27.65)]
    kill = event(16.0, "failure", cause="dead worker", ranks=[1], nodes=[1], failed_at=T0 + 15.5,
                 detected_at=T0 + 16.5)
    second = event(23.5, "failure", cause="dead worker", ranks=[0], nodes=[0], failed_at=T0 + 22.8,
                   detected_at=T0 + 23.5)
    events = [
        event(0.0, "launch", workers=2), event(2.0, "workers", attempt=0),
        event(10.0, "start", step=0, world_size=2),
        event(11.5, "first_step", step=1),
        event(16.0, "fault_injected", spec="random:kill_per_min=2", kind="kill", rank=1, step=4, index=0, at_s=4.5),
        kill,
        event(20.5, "restore", step=3, restored_from="keeper", seconds=0.5),
        event(20.5, "resume", step=3, world_size=2),
        event(21.5, "first_step", step=4),
        event(21.6, "recovery", cause="dead worker", ranks=[1], nodes=[1], failed_at=T0 + 15.5, detected_at=T0 + 16.5,
              restored_from="keeper", step=3, steps_lost=1, detect_s=1.0, restart_s=3.5, restore_s=0.5,
              first_step_s=1.0, downtime_s=6.0),
        event(23.0, "fault_injected", spec="random:kill_per_min=2", kind="kill", rank=0, step=5, index=1, at_s=11.5),
        second,
        event(25.4, "restore", step=5, restored_from="keeper", seconds=0.4),
        event(25.4, "resume", step=5, world_size=2),
        event(26.4, "first_step", step=6),
        event(26.5, "recovery", cause="dead worker", ranks=[0], nodes=[0], failed_at=T0 + 22.8, detected_at=T0 + 23.5,
              restored_from="keeper", step=5, steps_lost=0, detect_s=0.7, restart_s=1.5, restore_s=0.4,
              first_step_s=1.0, downtime_s=3.6),
        event(28.8, "end", step=7), event(29.0, "controller_done", restarts=2),
    ]
    return events, records


def test_every_second_of_a_run_lands_in_one_key_and_kept_steps_count_once():
    events, records = a_run()
    m = ettr_of(events, records)
    assert m["wall_s"] == pytest.approx(29.0)
    assert set(m["breakdown"]) == set(KEYS) and sum(m["breakdown"].values()) == pytest.approx(1.0)
    assert sum(m["seconds"].values()) == pytest.approx(29.0)
    s = m["seconds"]
    # kept: steps 1-3 of the first launch, 4-5 of the second, 6-7 of the third, each once at its own seconds (the
    # launches' first steps at the steady 1.0 s, their excess in startup / restart)
    assert m["kept_steps"] == 7 and m["trained_steps"] == 8
    assert s["train"] == pytest.approx(7 * STEP)
    # step 4's first record, step 5's 0.75 s in progress at 16.0, step 6's 0.25 s at 23.0
    assert s["lost"] == pytest.approx(1.25 + 0.75 + 0.25)
    assert s["detect"] == pytest.approx(0.5 + 0.5)  # 16.0-16.5 and 23.0-23.5
    assert s["restart"] == pytest.approx(3.5 + 1.5)  # 16.5-20.0 and 23.5-25.0 (the relaunched first steps: no excess)
    assert s["restore"] == pytest.approx(0.5 + 0.4)
    assert s["startup"] == pytest.approx(10.0 + 0.5)  # launch -> start, and the first step's 0.5 s excess
    assert s["snapshot"] == pytest.approx(0.25 * 4)  # steps 2, 3, 5 and 7 after a step of the same launch
    assert s["persist"] == pytest.approx(29.0 - 27.65)  # the final save
    assert m["ettr"] == pytest.approx(7 / 29.0)
    assert m["failures"] == 2 and m["faults"] == 2
    assert m["step_s"] == pytest.approx(STEP)


def test_a_fault_during_a_recovery_ends_its_segment_and_detection_starts_again():
    events, records = a_run()
    # the second kill now strikes during the second recovery's restore wait (24.0): restart 23.5 -> 24.0 is kept as
    # restart, then detect again from 24.0 to its detection at 24.2
    events = [e for e in events if e["event"] != "recovery" or e["step"] != 5]
    extra = [event(24.0, "fault_injected", spec="random:x", kind="kill", rank=1, step=5, index=2, at_s=12.5),
             event(24.2, "failure", cause="dead worker", ranks=[1], nodes=[1], failed_at=T0 + 23.9,
                   detected_at=T0 + 24.2)]
    m = ettr_of(sorted(events + extra, key=lambda e: e["time"]), records)
    assert sum(m["seconds"].values()) == pytest.approx(29.0)
    assert m["seconds"]["detect"] == pytest.approx(0.5 + 0.5 + 0.2)
    assert m["seconds"]["restart"] == pytest.approx(3.5 + 0.5 + 0.8)
    assert m["failures"] == 3


def test_terms_come_from_the_recoveries_with_detection_from_the_injected_instant(tmp_path):
    events, records = a_run()
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    m = measured_ettr(str(tmp_path))
    terms = run_terms(m)
    assert terms["detect_process_s"] == pytest.approx((0.5 + 0.5) / 2)  # not the heartbeat-based 1.0 and 0.7
    assert terms["restart_process_s"] == pytest.approx((3.5 + 1.5) / 2) == terms["restart_s"]
    assert terms["restore_keeper_s"] == pytest.approx(0.45)
    assert terms["first_step_s"] == pytest.approx(0.0)  # 1.0 s first steps against a 1.0 s steady step
    assert terms["startup_s"] == pytest.approx(10.5) and terms["end_s"] == pytest.approx(29.0 - 27.65)
    assert terms["detect_node_s"] is None and terms["restore_peer_s"] is None  # none in this run
    line = ettr_line(m)
    assert line.startswith(f"effective training time {7 / 29 * 100:.1f}% (") and "restart 17.2%" in line


def test_phalanx_report_prints_the_measured_effective_training_time(tmp_path):
    from phalanx.report import report

    events, records = a_run()
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert f"effective training time {7 / 29 * 100:.1f}% (" in report(str(tmp_path)).splitlines()[3]


def test_a_run_without_timed_steps_is_refused_naming_the_fix(tmp_path):
    from phalanx.errors import PhalanxError

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0, "step_seconds": 0.2}) + "\n")
    with pytest.raises(PhalanxError, match="no timed step records .* train the run again"):
        measured_ettr(str(tmp_path))
