"""The suite's skip policy, a pytest plugin loaded by conftest.py.

`make test` (and so CI) sets ``SFT_PLUGINS_STRICT_SKIPS=1``. Then a skipped test fails the run
unless its reason starts with :data:`GPU_SKIP_REASON`, the one thing this suite may truly lack on
a machine. A test that skips for a missing file or package would otherwise pass unseen: that is
how the parity tests went quiet on a fresh clone without the reference templates beside it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

STRICT_SKIPS_ENV = "SFT_PLUGINS_STRICT_SKIPS"
GPU_SKIP_REASON = "needs a CUDA GPU"
_unexpected_skips: list[str] = []


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if (os.environ.get(STRICT_SKIPS_ENV) == "1" and report.skipped
            and not hasattr(report, "wasxfail")
            and not _skip_reason(report).startswith(GPU_SKIP_REASON)):
        _unexpected_skips.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _unexpected_skips:
        terminalreporter.section(f"skips not allowed ({STRICT_SKIPS_ENV}=1)", red=True)
        for line in _unexpected_skips:
            terminalreporter.line(line)
        terminalreporter.line(f"only a skip whose reason starts with {GPU_SKIP_REASON!r} may "
                              "pass; install what is missing or make the test self-contained")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
