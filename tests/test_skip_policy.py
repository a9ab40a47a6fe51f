"""The skip policy (skip_policy.py): under `make test` a skip fails the run unless it is for a
missing GPU, so a test cannot go quiet on a machine that lacks a file or package."""

from __future__ import annotations

from pathlib import Path

import pytest
from skip_policy import GPU_SKIP_REASON, STRICT_SKIPS_ENV

SUITE = f'''
import pytest

def test_runs():
    pass

def test_skips_for_a_missing_file():
    pytest.skip("no official templates")

@pytest.mark.skipif(True, reason="{GPU_SKIP_REASON} (bf16 kernels)")
def test_skips_for_the_gpu():
    pass

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
'''


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, strict: str | None,
        source: str = SUITE) -> pytest.RunResult:
    pytester.makepyfile(test_suite=source)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    if strict is None:
        monkeypatch.delenv(STRICT_SKIPS_ENV, raising=False)
    else:
        monkeypatch.setenv(STRICT_SKIPS_ENV, strict)
    return pytester.runpytest_subprocess("-p", "skip_policy", "-p", "no:cacheprovider")


def test_strict_run_fails_on_a_skip_that_is_not_for_a_gpu(pytester, monkeypatch):
    result = run(pytester, monkeypatch, "1")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    result.stdout.fnmatch_lines(["*skips not allowed*",
                                 "test_suite.py::test_skips_for_a_missing_file: no official "
                                 "templates"])
    assert "test_skips_for_the_gpu:" not in result.stdout.str()


def test_strict_run_passes_when_only_the_gpu_is_missing(pytester, monkeypatch):
    only_gpu = SUITE.replace('pytest.skip("no official templates")', "pass")
    result = run(pytester, monkeypatch, "1", only_gpu)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=2, skipped=1, xfailed=1)


def test_a_plain_pytest_run_reports_skips_without_failing(pytester, monkeypatch):
    assert run(pytester, monkeypatch, None).ret == pytest.ExitCode.OK


def test_make_test_turns_the_policy_on():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert f"{STRICT_SKIPS_ENV}=1" in makefile.split("\ntest:")[1].split("\n\n")[0]
