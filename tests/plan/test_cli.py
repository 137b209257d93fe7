"""``sonar-ft plan --effective_batch`` (the old ``--batch_size`` still works, with a note saying what it meant)."""

from __future__ import annotations

import json

from sonar_ft import cli


def _plan(tmp_path, capsys, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--gpu", "t4", *flags, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().err


def test_effective_batch_is_split_into_micro_batches(tmp_path, capsys):
    plan, err = _plan(tmp_path, capsys, "--effective_batch", "48")
    assert plan["effective_batch"] == 48 and "deprecated" not in err
    flags = plan["flags"]
    micro, accum = int(flags[flags.index("--batch_size") + 1]), int(flags[flags.index("--grad_accum") + 1])
    assert micro * accum == 48 and accum > 1  # on a T4 the micro-batch is smaller than the effective batch


def test_old_batch_size_flag_plans_the_same_with_a_note(tmp_path, capsys):
    new, _ = _plan(tmp_path, capsys, "--effective_batch", "48")
    old, err = _plan(tmp_path, capsys, "--batch_size", "48")
    assert old == new
    assert "--batch_size` is deprecated" in err and "--effective_batch 48" in err


def test_old_and_new_flag_that_disagree_are_one_line_error(capsys):
    assert cli.main(["plan", "--gpu", "t4", "--batch_size", "16", "--effective_batch", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch_size 16 and --effective_batch 32 disagree" in err[0]
