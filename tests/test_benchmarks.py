"""The side-by-side benchmark's own arithmetic and bookkeeping (benchmarks/run.py)."""

from __future__ import annotations

import pytest

from benchmarks.run import GOALS, SMALL_HEAD_VOCAB, goals, spawn, summarise


def result(step_s: float, trained_tps: float, peak: float = 1.0) -> dict[str, float]:
    return {"step_s": step_s, "trained_tokens_per_s": trained_tps, "real_tokens_per_s": 1.0,
            "real_fraction": 0.5, "peak_bytes": peak}


def test_ratios_are_taken_pair_by_pair_then_the_median():
    # Round 2 was slow for both (a busy machine): per-round ratios cancel it out, a ratio of
    # medians would not.
    runs = {"ours": [result(1.0, 10), result(10.0, 1), result(1.2, 9)],
            "ref": [result(2.0, 5), result(20.0, 0.5), result(2.0, 5)]}
    summary = summarise(runs, "ref")
    assert summary["ours"]["step_ratio"] == pytest.approx(0.5)
    assert summary["ours"]["trained_tps_ratio"] == pytest.approx(2.0)
    assert summary["ours"]["step_s"] == pytest.approx(1.2)
    assert summary["ref"]["step_ratio"] == pytest.approx(1.0)


def test_goals_are_judged_against_the_issue_thresholds():
    packed = {"real_fraction": GOALS["packed_real_fraction"] + 0.01,
              "trained_tps_ratio": GOALS["packed_speedup"] - 0.01}
    ours = {"step_ratio": GOALS["step_ratio"] + 0.01, "memory_ratio": GOALS["memory_ratio"]}
    verdicts = goals({"step": {"results": {"ours": ours}},
                      "padding": {"results": {"packed": packed}}})
    assert [goal.split()[:2] for goal, _, _ in verdicts] == [
        ["step", "time"], ["peak", "memory"], ["packed", "rows"], ["packed", ">="]]
    assert [met for _, _, met in verdicts] == [False, True, True, False]


@pytest.mark.slow
def test_padded_and_packed_epochs_train_the_same_tokens_with_less_padding(tmp_path):
    spec = {"device": "cpu", "size": "small", "seed": 0, "batch": 4, "warmup": 0, "steps": 0,
            "examples": 24, "data": "skewed", "epoch": True, "vocab": SMALL_HEAD_VOCAB}
    padded = spawn({**spec, "kind": "padded", "output_dir": str(tmp_path / "padded")})
    packed = spawn({**spec, "kind": "packed", "output_dir": str(tmp_path / "packed")})
    assert padded["steps"] == 24 // 4
    assert packed["real_tokens"] == padded["real_tokens"]
    assert packed["trained_tokens"] == padded["trained_tokens"] > 0
    assert padded["real_tokens"] < padded["computed_tokens"]
    assert packed["computed_tokens"] < padded["computed_tokens"]
    assert packed["steps"] < padded["steps"]
    assert packed["peak_bytes"] > 0 and packed["seconds"] > 0
