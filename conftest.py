"""The fast tier: ``bash scripts/test.sh --fast`` (``LIGHTNING_CMP_FAST=1``) runs only what runs in this process.

Every way a test can start a process goes through ``subprocess.Popen`` (Lightning's launcher, ``torchrun``, the
command-line tests) or ``multiprocessing``'s ``Process.start`` (worker pools, torch's spawn); in the fast tier both
skip the test (or the fixture) that calls them, so the tier needs no list of which tests start workers and cannot
miss one. Outside a test's set-up and call (collection, imports) they run as usual. At the repository root so that
the package's doctests are covered too.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

FAST = os.environ.get("LIGHTNING_CMP_FAST") == "1"
_REASON = "starts a process: left out of the fast tier (scripts/test.sh --fast); the full suite runs it"
_inside = False  # in a test's set-up (its fixtures) or call


@contextmanager
def _in_test() -> Iterator[None]:
    global _inside
    _inside = True
    try:
        yield
    finally:
        _inside = False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with _in_test():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with _in_test():
        return (yield)


def pytest_configure(config: pytest.Config) -> None:
    if not FAST:
        return
    popen, start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def no_popen(self: Any, *args: Any, **kwargs: Any) -> None:
        if _inside:
            pytest.skip(_REASON)
        popen(self, *args, **kwargs)

    def no_start(self: Any) -> None:
        if _inside:
            pytest.skip(_REASON)
        start(self)

    subprocess.Popen.__init__ = no_popen  # type: ignore[method-assign]
    multiprocessing.process.BaseProcess.start = no_start  # type: ignore[method-assign]
