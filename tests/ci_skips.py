"""pytest plugin: with ``CI=true`` a skipped test is a failed test.

Locally a test may skip when something it needs is missing (the LiteLLM proxy, inotify);
in CI that would hide a broken set-up behind a green run, so every skip (``pytest.skip``
in a test or fixture, ``skipif`` marks, a module skipped at collection) is reported as a
failure that keeps the skip's reason. Expected failures (``xfail``) are left alone.
Loaded by tests/conftest.py (``pytest_plugins``); .ci/run sets ``CI=true``.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

PREFIX = "skipped with CI=true, which counts as a failure"


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, line, message = longrepr
        return f"{message} ({path}:{line})"
    return str(longrepr)


def _fail(report: pytest.TestReport | pytest.CollectReport) -> None:
    report.outcome = "failed"
    report.longrepr = f"{PREFIX}: {_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[Any]:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        _fail(report)
