"""Ours, not FastAPI's: what FastAPI's own test setup provides to the ported tests."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # FastAPI groups the tests that use the working directory for pytest-xdist.
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist's test grouping")


@pytest.fixture(autouse=True)
def _fresh_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tutorials write ``log.txt`` in the working directory: one of its own each."""
    monkeypatch.chdir(tmp_path)
