"""``python -m models``: the parameter report reproduces the paper's table (docs/paper_preset.md)."""

from __future__ import annotations

import json

from models.__main__ import main


def test_report_universal_separable_paper_tasks(capsys):
    assert (
        main(["--train_mode", "universal", "--module", "separable_adapter", "--plans_dir", "/nonexistent"])
        == 0
    )
    out = capsys.readouterr().out
    assert "6,577,460" in out and "134,508,692" in out
    assert "ratio to independent models: 4.89%" in out
    assert "ratio to the shared model:   19.84%" in out


def test_report_independent_lists_each_task(capsys):
    assert main(["--train_mode", "independent", "--tasks", "Task04_Hippocampus", "Task05_Prostate"]) == 0
    out = capsys.readouterr().out
    assert "2,055,285" in out and "33,113,765" in out


def test_report_reads_plans_of_unknown_task(tmp_path, capsys):
    (tmp_path / "Task42_Kidney").mkdir()
    plans = {"modalities": ["CT"], "num_classes": 3, "pools_per_axis": [2, 2, 2]}
    (tmp_path / "Task42_Kidney" / "plans.json").write_text(json.dumps(plans))
    code = main(
        [
            "--train_mode",
            "shared",
            "--tasks",
            "Task42_Kidney",
            "--plans_dir",
            str(tmp_path),
            "--base_channels",
            "4",
            "--pools",
            "2",
            "2",
            "2",
        ]
    )
    assert code == 0
    assert "task Task42_Kidney" in capsys.readouterr().out


def test_report_unknown_task_without_plans_is_a_clear_error(tmp_path, capsys):
    assert main(["--tasks", "Task77_Unknown", "--plans_dir", str(tmp_path)]) == 2
    assert "unknown task 'Task77_Unknown'" in capsys.readouterr().err
