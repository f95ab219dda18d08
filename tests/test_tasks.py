"""Collecting tasks: validation at add_task time, names, @task, current_tasks()."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio

import trio_bg
from trio_bg._engine.tasks import Task
from trio_bg._web.collection import RequestTasks, face_of


async def notify(user: str, *, subject: str = "") -> None:
    pass


def write_log(line: str) -> None:
    pass


class AsyncCallable:
    async def __call__(self, n: int) -> None:
        pass


class SyncCallable:
    def __call__(self) -> None:
        pass


@pytest.mark.parametrize(
    ("func", "args", "is_async"),
    [
        (notify, ("ann",), True),
        (write_log, ("x",), False),
        (functools.partial(notify, "ann"), (), True),
        (functools.partial(functools.partial(notify), "ann"), (), True),
        (AsyncCallable(), (1,), True),
        (SyncCallable(), (), False),
        (print, ("builtin",), False),
    ],
)
def test_async_and_plain_callables_are_told_apart(
    func: Any, args: tuple[Any, ...], is_async: bool
) -> None:
    assert Task(func, args, {}).is_async is is_async


def test_a_coroutine_object_is_refused_with_the_fix_in_the_message() -> None:
    with pytest.raises(TypeError, match=r"add_task\(notify, \.\.\.\) instead of add_task\(notify"):
        Task(notify("ann"), (), {})  # type: ignore[arg-type]


@pytest.mark.parametrize("not_callable", [None, 3, "notify", b"x"])
def test_a_non_callable_is_refused(not_callable: object) -> None:
    with pytest.raises(TypeError, match="takes a callable"):
        Task(not_callable, (), {})  # type: ignore[arg-type]


async def agen() -> AsyncIterator[int]:
    yield 1


def gen() -> Iterator[int]:
    yield 1


@pytest.mark.parametrize("func", [agen, gen, functools.partial(gen)])
def test_generator_functions_are_refused(func: Any) -> None:
    with pytest.raises(TypeError, match="generator function"):
        Task(func, (), {})


@pytest.mark.parametrize(
    ("args", "kwargs", "complaint"),
    [
        ((), {}, r"notify\(\) missing 1 required positional argument: 'user'"),
        (("ann", "bob"), {}, r"notify\(\) takes 1 positional argument but 2 were given"),
        (("ann",), {"subjct": "hi"}, r"notify\(\) got an unexpected keyword argument 'subjct'"),
    ],
)
def test_arguments_that_do_not_fit_are_refused_at_once(
    args: tuple[Any, ...], kwargs: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(TypeError, match=rf"add_task\(\): {complaint}"):
        Task(notify, args, kwargs)


def test_names_are_qualified_names_and_reprs_hide_arguments() -> None:
    assert Task(notify, ("secret@example.com",), {}).name == "notify"
    assert Task(functools.partial(notify, "x"), (), {}).name == "notify"
    assert Task(AsyncCallable(), (1,), {}).name == "AsyncCallable"
    assert Task(AsyncCallable().__call__, (1,), {}).name == "AsyncCallable.__call__"
    assert "secret" not in repr(Task(notify, ("secret@example.com",), {}))


def test_the_task_decorator_sets_name_and_timeout_bare_or_with_options() -> None:
    @trio_bg.task
    async def bare() -> None:
        pass

    @trio_bg.task(name="emails.send", timeout=2.5)
    async def send() -> None:
        pass

    assert Task(bare, (), {}).name.endswith("<locals>.bare")  # the qualified name
    assert Task(bare, (), {}).timeout is None
    task = Task(functools.partial(send), (), {})
    assert (task.name, task.timeout) == ("emails.send", 2.5)


async def test_the_decorated_function_is_still_the_same_function() -> None:
    calls = []

    @trio_bg.task(timeout=1)
    async def record(n: int) -> int:
        calls.append(n)
        return n

    assert await record(3) == 3
    assert calls == [3]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"timeout": 0}, ValueError),
        ({"timeout": -1}, ValueError),
        ({"timeout": float("inf")}, ValueError),
        ({"timeout": "5"}, TypeError),
        ({"timeout": True}, TypeError),
        ({"name": ""}, TypeError),
        ({"name": 3}, TypeError),
    ],
)
def test_bad_task_options_are_refused(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        trio_bg.task(**options)


def test_current_tasks_outside_a_request_names_the_middleware() -> None:
    with pytest.raises(RuntimeError, match="BackgroundTaskMiddleware"):
        trio_bg.current_tasks()


async def test_add_task_checks_at_once_and_collects_until_the_hand_off() -> None:
    async with trio_bg.open_background_nursery() as nursery:
        collection = RequestTasks(nursery, ordered=False)
        tasks = face_of(collection)
        ran = trio.Event()

        async def job() -> None:
            ran.set()

        with pytest.raises(TypeError):
            tasks.add_task(job, 1)  # type: ignore[call-arg]
        tasks.add_task(job)
        assert len(tasks) == 1
        assert nursery.stats.reserved == 1 and nursery.stats.accepted == 0
        collection.hand_off()
        assert len(tasks) == 0
        await ran.wait()
        # After the hand-off, a task goes to the nursery at once.
        ran = trio.Event()
        tasks.add_task(job)
        await ran.wait()
    assert nursery.report.completed == 2


async def test_awaiting_the_collection_hands_it_off_like_a_starlette_background() -> None:
    ran = trio.Event()

    async def job() -> None:
        ran.set()

    async with trio_bg.open_background_nursery() as nursery:
        tasks = face_of(RequestTasks(nursery, ordered=False))
        tasks.add_task(job)
        await tasks()
        assert len(tasks) == 0
        await ran.wait()
        await tasks()  # again: nothing left to hand off
    assert nursery.report.completed == 1
