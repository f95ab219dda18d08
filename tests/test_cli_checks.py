"""``python -m trio_bg serve`` refuses, before serving, what it could not finish with:
a ``--report-json`` path it cannot write, an app that is not an ASGI 3 app.

The subprocess tests serve this module's apps (run from this directory); every wait is
bounded by a timeout.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from quart_trio import QuartTrio
from starlette.applications import Starlette

import trio_bg
from trio_bg._cli.main import _not_asgi3, _write_json
from trio_bg._web.middleware import Receive, Scope, Send

BOUND = 15.0
TESTS = Path(__file__).parent


# -- the apps the subprocesses serve, and the callables the check classifies ------------


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return


def wsgi_app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


async def app_with_options(scope: Scope, receive: Receive, send: Send, debug: bool = False) -> None:
    pass


async def app_taking_args(*args: object) -> None:
    pass


async def app_with_config(config: object, scope: Scope, receive: Receive, send: Send) -> None:
    pass


class AppObject:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pass


class WSGIObject:
    def __call__(self, environ: object, start_response: object) -> None:
        pass


class ASGI2App:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def __call__(self, receive: Receive, send: Send) -> None:
        pass


def asgi2_function(scope: Scope) -> Callable[[Receive, Send], object]:
    return AppObject().__call__


def sync_app(scope: Scope, receive: Receive, send: Send) -> None:
    pass


class SyncObject:
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pass


async def scope_only(scope: Scope) -> None:
    pass


async def keyword_required(scope: Scope, receive: Receive, send: Send, *, debug: bool) -> None:
    pass


@functools.wraps(app)
def sync_wrapper(*args: object) -> object:
    return app(*args)  # type: ignore[arg-type]


ASGI3 = [
    app,
    app_with_options,
    app_taking_args,
    functools.partial(app_with_config, None),
    AppObject(),
    sync_wrapper,  # a wrapper (functools.wraps) that returns the async def's awaitable
    Starlette(),
    FastAPI(),
    QuartTrio(__name__),
    trio_bg.BackgroundTaskMiddleware(app),
    functools.partial(max),  # no signature to inspect: the benefit of the doubt
]

NOT_ASGI3 = [
    (wsgi_app, "a WSGI app (environ, start_response)"),
    (WSGIObject(), "a WSGI app (environ, start_response)"),
    (ASGI2App, "an ASGI 2 app (a class taking the scope)"),
    (asgi2_function, "an ASGI 2 app (it takes the scope alone)"),
    (AppObject, "a class"),
    (sync_app, "a sync function"),
    (SyncObject(), "an object whose __call__ is not async"),
    (scope_only, "an async callable with the signature (scope: 'Scope')"),
    (keyword_required, "an async callable with the signature (scope: 'Scope', receive: "),
]


@pytest.mark.parametrize("candidate", ASGI3)
def test_asgi3_apps_pass_the_check(candidate: Callable[..., object]) -> None:
    assert _not_asgi3(candidate) is None


@pytest.mark.parametrize(("candidate", "found"), NOT_ASGI3)
def test_what_is_not_an_asgi3_app_is_named(candidate: Callable[..., object], found: str) -> None:
    description = _not_asgi3(candidate)
    assert description is not None
    assert description.startswith(found)


# -- the command -------------------------------------------------------------------------


def serve(*options: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m trio_bg serve`` with ``options``: it must refuse before serving
    (or be killed after `BOUND` seconds, and the test fails)."""
    return subprocess.run(
        [sys.executable, "-m", "trio_bg", "serve", "--bind=127.0.0.1:0", *options],
        cwd=TESTS,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=BOUND,
        check=False,
    )


def test_a_wsgi_app_is_refused_before_serving() -> None:
    result = serve("test_cli_checks:wsgi_app")
    assert result.returncode == 2
    assert (
        b"cannot serve 'test_cli_checks:wsgi_app': it is a WSGI app (environ, start_response), "
        b"not an ASGI 3 app" in result.stderr
    )


@pytest.mark.parametrize(
    ("bind", "problem"),
    [
        ("127.0.0.1:99999", "the port must be 0 to 65535, not 99999"),
        ("[::1]:-1", "the port must be 0 to 65535, not -1"),
        ("fd://stdin", "expected fd://N, N a file descriptor, not fd://stdin"),
    ],
)
def test_an_impossible_bind_is_refused_in_one_line(bind: str, problem: str) -> None:
    """Before: three exception group tracebacks, exit status 3."""
    result = serve("test_cli_checks:app", f"--bind={bind}")
    assert result.returncode == 2
    assert result.stderr.decode().endswith(f"error: argument --bind: {problem}\n")
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_report_path_in_no_directory_is_refused_before_serving(
    tmp_path: Path, workers: str
) -> None:
    path = tmp_path / "missing" / "report.json"
    result = serve("test_cli_checks:app", f"--report-json={path}", f"--workers={workers}")
    assert result.returncode == 2
    assert f"--report-json {path}: no directory {path.parent}".encode() in result.stderr
    assert b"Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_report_path_that_is_a_directory_is_refused_before_serving(
    tmp_path: Path,
) -> None:
    result = serve("test_cli_checks:app", f"--report-json={tmp_path}")
    assert result.returncode == 2
    assert f"--report-json {tmp_path}: is a directory".encode() in result.stderr
    assert list(tmp_path.iterdir()) == []
    assert not tmp_path.with_name(tmp_path.name + ".partial").exists()


def test_a_report_that_cannot_be_written_leaves_no_file_behind(tmp_path: Path) -> None:
    (tmp_path / "report.json").mkdir()  # os.replace cannot put a file there
    with pytest.raises(IsADirectoryError):
        _write_json(tmp_path / "report.json", {"accepted": 0})
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]


def test_a_report_is_written_whole(tmp_path: Path) -> None:
    _write_json(tmp_path / "report.json", {"accepted": 1})
    assert (tmp_path / "report.json").read_text() == '{\n  "accepted": 1\n}\n'
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]
