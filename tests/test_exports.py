"""The public surface, pinned (as trio's ``test_exports``): every public name of every
public module, the pytest plugin's entry point, and the command line's subcommands. A
move inside the private layers can never drop or rename one of them."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import subprocess
import sys

import pytest

PUBLIC = {
    "trio_bg": [
        "BackgroundNursery",
        "BackgroundTaskMiddleware",
        "BackgroundTasks",
        "Backoff",
        "DEFAULT_GRACE_PERIOD",
        "HandoffError",
        "JournalError",
        "NurseryClosed",
        "NurseryOptions",
        "Overloaded",
        "ShutdownReport",
        "TaskEvent",
        "TaskHandle",
        "TaskStats",
        "TaskStatus",
        "cancel_task",
        "current_tasks",
        "lease_held",
        "open_background_nursery",
        "serve",
        "set_progress",
        "task",
        "task_status",
        "wait_task",
    ],
    "trio_bg.testing": ["TaskFailures", "TestClient", "open_test_client"],
    "trio_bg.status": ["app"],
    "trio_bg.metrics": ["app"],
    "trio_bg.dashboard": ["app"],
    "trio_bg.streaq": ["DEFAULT_GRACE_PERIOD", "DEFAULT_IDLE_TIMEOUT", "check_worker", "worker"],
    "trio_bg.starlette": ["TestClient", "install", "middleware_of", "overloaded_handler"],
    "trio_bg.fastapi": [
        "Tasks",
        "TestClient",
        "adopt_background_tasks",
        "install",
        "middleware_of",
        "overloaded_handler",
        "request_tasks",
    ],
    "trio_bg.quart_trio": [
        "EXTENSION_KEY",
        "TestApp",
        "add_background_task",
        "init_app",
        "middleware_of",
    ],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_every_public_name_is_exported_and_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(PUBLIC[module_name])
    for name in PUBLIC[module_name]:
        value = getattr(module, name)
        if callable(value) or inspect.isclass(value):
            assert inspect.getdoc(value), f"{module_name}.{name} has no docstring"


def test_the_pytest_plugin_is_registered() -> None:
    [entry] = [
        entry
        for entry in importlib.metadata.entry_points(group="pytest11")
        if entry.name == "trio_bg"
    ]
    assert entry.value == "trio_bg._pytest_plugin"
    assert entry.load().__name__ == "trio_bg._pytest_plugin"


def test_the_command_line_keeps_its_subcommands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_bg", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("serve", "drill", "journal", "worker"):
        assert command in result.stdout
