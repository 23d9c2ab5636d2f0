"""Head to head between arms (``cai compare``) and the report's arm-vs-arm sections, on hand-made inputs.

The end-to-end path (a real tiny sweep, the judge, the artifact, its reuse) is checked in
tests/test_experiments.py; here the pure builders get values computed by hand and the checks
that refuse mismatched runs get their messages checked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cai.errors import ConfigError, DataError
from cai.evaluate.compare import Side, check_same_prompts, pair_settings
from cai.report.h2h import (
    h2h_matrices,
    mean_matrix,
    paired_rows,
    per_prompt,
)
from cai.report.runs import load_head_to_head


def _row(seed, a, b, w, lo, hi, **counts):
    return {"seed": seed, "arm_a": a, "arm_b": b, "win_rate": w, "ci_low": lo, "ci_high": hi,
            "wins": 0, "ties": 0, "losses": 0, "invalid": 0, "n": 0, **counts}


def test_matrix_fills_both_directions_and_never_the_diagonal():
    m = h2h_matrices([_row(0, "ppo", "dpo", 0.75, 0.5, 0.9), _row(0, "ppo", "sft", 0.6, 0.4, 0.8)])[0]
    assert m[("ppo", "dpo")] == (0.75, 0.5, 0.9)
    assert m[("dpo", "ppo")] == pytest.approx((0.25, 0.1, 0.5))  # 1 - rate, interval mirrored
    assert m[("sft", "ppo")] == pytest.approx((0.4, 0.2, 0.6))
    assert ("ppo", "ppo") not in m and ("dpo", "sft") not in m  # never judged: no cell


def test_mean_matrix_over_seeds_uses_a_student_t_interval():
    rows = [_row(0, "a", "b", 0.6, 0.5, 0.7), _row(1, "a", "b", 0.8, 0.7, 0.9)]
    mean = mean_matrix(h2h_matrices(rows))
    (value, low, high), n = mean[("a", "b")]
    # mean 0.7, sd 0.1414, t(0.975, 1) = 12.706: half width 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert n == 2 and value == pytest.approx(0.7)
    assert low == pytest.approx(0.7 - 1.2706, abs=1e-3) and high == pytest.approx(0.7 + 1.2706, abs=1e-3)
    (value_ba, _, _), _ = mean[("b", "a")]
    assert value_ba == pytest.approx(0.3)


def test_per_prompt_scores_leave_out_invalid_and_absent_quantities():
    rows = [{"prompt_id": "p1", "outcome": "win", "kl": 0.5, "arm_tokens": 4},
            {"prompt_id": "p2", "outcome": "tie", "kl": 0.25, "arm_tokens": 6},
            {"prompt_id": "p3", "outcome": "loss", "kl": 0.0, "arm_tokens": 5},
            {"prompt_id": "p4", "outcome": "invalid", "kl": 1.0, "arm_tokens": 3}]
    q = per_prompt(rows)
    assert q["score vs SFT"] == {"p1": 1.0, "p2": 0.5, "p3": 0.0}
    assert q["KL to SFT"] == {"p1": 0.5, "p2": 0.25, "p3": 0.0, "p4": 1.0}
    assert "held-out RM score" not in q  # no rm_score field: absent, not zero
    assert per_prompt(rows, ties="excluded")["score vs SFT"] == {"p1": 1.0, "p3": 0.0}


def test_paired_rows_by_hand():
    a = {"score vs SFT": {"p1": 1.0, "p2": 1.0, "p3": 0.0, "p4": 1.0}, "KL to SFT": {"p1": 0.1}}
    b = {"score vs SFT": {"p1": 0.0, "p2": 1.0, "p3": 0.0, "p4": 0.0}}
    rows = paired_rows({"A": a, "B": b}, n_boot=200, seed=0)
    assert len(rows) == 1  # KL is measured in A only: no pair for it
    arm_a, arm_b, label, diff, p, n = rows[0]
    assert (arm_a, arm_b, label, n) == ("A", "B", "score vs SFT", "4")
    # differences 1, 0, 0, 1: mean 0.5; exact sign flips: |sum| >= 2 in 8 of 16 patterns -> p = 0.5
    assert diff.startswith("0.5 [") and p == "0.5"


def test_head_to_head_file_errors_name_row_and_field(tmp_path):
    assert load_head_to_head(tmp_path) is None
    (tmp_path / "head_to_head.json").write_text(json.dumps({"rows": [_row(0, "a", "b", 0.5, 0.4, 0.6),
                                                                     {"seed": 0, "arm_a": "a"}]}))
    with pytest.raises(DataError, match=r"row 2 has no field 'arm_b'"):
        load_head_to_head(tmp_path)
    bad = _row(0, "a", "b", "high", 0.4, 0.6)
    (tmp_path / "head_to_head.json").write_text(json.dumps({"rows": [bad]}))
    with pytest.raises(DataError, match=r"row 1, field 'win_rate'"):
        load_head_to_head(tmp_path)
    (tmp_path / "head_to_head.json").write_text(json.dumps({"rows": [_row(0, "a", "b", "NaN", "NaN", "NaN")]}))
    assert math.isnan(load_head_to_head(tmp_path)[0]["win_rate"])


def _side(run: str, judge_model: str = "tiny", **eval_extra) -> Side:
    ecfg = {"judge": {"backend": "hf", "model": judge_model}, "question": None, "ties": "half",
            "tie_margin": 0.0, "bootstrap_resamples": 100, **eval_extra}
    return Side(f"arm_{run}", run, {"config": {"eval": ecfg}, "artifacts": {"prompts": "prompts-" + "0" * 20},
                                    "seed": 0})


def test_mismatched_runs_are_refused_naming_both():
    a, b = _side("0"), _side("1")
    assert pair_settings(a, b)["ties"] == "half"
    with pytest.raises(ConfigError, match=r"runs 0 and 2 were evaluated by different held-out judges"):
        pair_settings(a, _side("2", judge_model="other"))
    with pytest.raises(ConfigError, match=r"runs 0 and 3: eval.tie_margin differs"):
        pair_settings(a, _side("3", tie_margin=0.1))
    rows_a = [{"prompt_id": "p1"}, {"prompt_id": "p2"}]
    check_same_prompts(a, b, rows_a, list(rows_a))
    with pytest.raises(DataError, match=r"runs 0 and 1: .* first differ at row 2 \(field 'prompt_id'\)"):
        check_same_prompts(a, b, rows_a, [{"prompt_id": "p1"}, {"prompt_id": "p9"}])


def test_report_without_head_to_head_says_how_to_get_it(tmp_path):
    from types import SimpleNamespace

    from cai.report.h2h import head_to_head_section

    s = head_to_head_section(SimpleNamespace(root=Path(tmp_path), arms=[], head_to_head=None))
    assert not s.tables and "run cai compare" in s.notes[0]
