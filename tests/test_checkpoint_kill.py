"""Kill -9 and full disks at chosen moments of checkpointing, for the file format and DeepSpeed ZeRO-3 folders.

``tests/scripts/ckpt_kill_matrix.py`` runs ``lit_sft fit`` (10 rows, 2 epochs of 5 optimizer steps, ``save_steps 3``,
``save_total_limit 2``: checkpoints at 3, 6, 9 and the final 10; fp32 CPU; ZeRO-3 with 2 gloo processes) as a job
preempted again and again: each phase is killed at one moment (mid-write, before ``fsync``, mid-copy across file
systems with ``TMPDIR`` on ``/dev/shm``, ENOSPC, before/after the rename, before the completion marker, between a
save and the rotation, mid-deletion, during the export, before the finished record) and the next phase resumes from
what it left. Checked here, against an uninterrupted run of the same command:

* every phase ends the way it was killed, and leaves no final-named checkpoint that fails to load (independent
  check: ``torch.load`` of the file or of every DeepSpeed file), nothing in ``TMPDIR``, at most one checkpoint over
  ``save_total_limit`` (a kill between a save and the rotation; repaired by the next start);
* the completing run ends with the final weights bit-identical to the uninterrupted run's, exactly
  ``save_total_limit`` checkpoints and no leftover file;
* running the finished run again says so and changes no file.
"""

from __future__ import annotations

import json

import pytest

from sft_harness import run_script

LIMIT = 2
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fmt", ["plain", "deepspeed"])
def test_kill_matrix(tmp_path, fmt):
    report_path = tmp_path / "report.json"
    run_script("tests/scripts/ckpt_kill_matrix.py", "--format", fmt, "--work", str(tmp_path / "work"),
               "--report", str(report_path), timeout=1800)
    report = json.loads(report_path.read_text())
    assert all(end == 0 for end in report["reference"]), report["reference"]
    print(f"\n{fmt}: {len(report['phases'])} kill points, {report['seconds']} s")
    for phase in report["phases"]:
        moment, ends = phase["moment"], phase["ends"]
        print(f"  {moment}: {ends} -> {phase['checkpoints']} {phase['others']}")
        assert phase["expected"] in ends, (moment, ends)  # SIGKILL, or exit code 1 for ENOSPC
        assert not phase["problems"], (moment, phase["problems"])
        assert not phase["tmpdir"], (moment, phase["tmpdir"])
        assert len(phase["checkpoints"]) <= LIMIT + 1, (moment, phase["checkpoints"])
    done = report["completion"]
    assert all(end == 0 for end in done["ends"]), (done, report["log"])
    assert done["checkpoints"] == ["step-000009.ckpt", "step-000010.ckpt"], done
    assert done["others"] == ["finished.json"] and not done["problems"] and not done["tmpdir"], done
    assert report["identical"], f"final weights differ from the uninterrupted run by {report['max_abs_diff']}"
    assert all(end == 0 for end in report["finished_rerun"]) and report["said_finished"], report["log"]
    assert report["finished_rerun_changed"] == [] and not report["model_rewritten"], report
