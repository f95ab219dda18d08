"""Poisoned records: what no trio_bg (or streaq) sender writes, planted in Redis by hand
between good tasks. A real ``python -m trio_bg worker streaq_app:tasks`` sets each one
aside (acknowledged, its result a failure saying why, logged at ERROR without its data)
and runs the good tasks; it never dies of one.

Every wait is bounded; every child process is killed on the way out.
"""

from __future__ import annotations

import json
import pickle
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from processes import BOUND
from redis_server import RedisServer
from test_remote_drill import LOAD, needs_redis, run
from test_streaq_worker import ledger, streaq_app, worker_process

SECRET = "s3cret-personal-data"
"""In every poisoned record's arguments: it must never reach the worker's log."""

RECORD = "tests.streaq_app.record"

POISONED: dict[str, str | bytes] = {
    "a list": json.dumps([RECORD, [SECRET], {}, 0]),
    "a number": "3",
    "null": "null",
    "a string": json.dumps(SECRET),
    "no function": json.dumps({"a": [SECRET], "k": {}, "t": 0}),
    "a function that is a list": json.dumps({"f": [RECORD], "a": [SECRET], "k": {}, "t": 0}),
    "arguments that are a string": json.dumps({"f": RECORD, "a": SECRET, "k": {}, "t": 0}),
    "no arguments": json.dumps({"f": RECORD, "k": {"key": SECRET}, "t": 0}),
    "keywords that are a list": json.dumps({"f": RECORD, "a": [SECRET], "k": [], "t": 0}),
    "no time": json.dumps({"f": RECORD, "a": [SECRET], "k": {}}),
    "a time that is text": json.dumps({"f": RECORD, "a": [SECRET], "k": {}, "t": "now"}),
    "a dependent that is a number": json.dumps(
        {"f": RECORD, "a": [SECRET], "k": {}, "t": 0, "T": 7}
    ),
    "a trace that is a list": json.dumps(
        {"f": RECORD, "a": [SECRET], "k": {}, "t": 0, "trio_bg": {"trace": [SECRET]}}
    ),
    "trio_bg's data that is a string": json.dumps(
        {"f": RECORD, "a": [SECRET], "k": {}, "t": 0, "trio_bg": SECRET}
    ),
    "a previous task that is gone": json.dumps(
        {"f": RECORD, "a": [SECRET], "k": {}, "t": 0, "A": uuid.uuid4().hex}
    ),
    "an unknown function, misshapen": json.dumps({"f": "nobody.knows", "a": SECRET}),
    "not JSON": f"{{not json {SECRET}",
    "not UTF-8": b"\xff\xfe" + SECRET.encode(),
    "a pickle": pickle.dumps({"f": RECORD, "a": [SECRET], "k": {}, "t": 0}),
}


async def plant(tasks: Any, record: str | bytes) -> str:
    """Put ``record`` in Redis as a task's data, and its id in the queue's stream, as
    streaq's ``publish_task`` does; return the task's id."""
    task_id = uuid.uuid4().hex
    await tasks.redis.set(tasks.task_key + task_id, record)
    await tasks.redis.xadd(
        tasks.stream_key + tasks.priorities[-1], {"task_id": task_id, "enqueue_time": 0}
    )
    return task_id


async def wait_until_all_ran(worker: Any, tmp_path: Path, keys: set[str]) -> None:
    """Return once the ledger names every one of ``keys``; fail at once if the worker
    exits (the caller bounds the wait)."""
    # The ledger is a file that the worker appends to: there is no event to wait on.
    while {line.split()[0] for line in ledger(tmp_path)} < keys:
        assert worker.process.poll() is None, worker.output.text
        await trio.sleep(0.05)


async def test_every_poisoned_record_is_set_aside_and_the_worker_goes_on(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = streaq_app(monkeypatch, redis_server.url)
    poisoned: dict[str, str] = {}
    async with app.tasks:
        await app.record.enqueue("good-first")
        for number, (shape, record) in enumerate(POISONED.items()):
            poisoned[shape] = await plant(app.tasks, record)
            await app.record.enqueue(f"good-{number}")
    good = {"good-first"} | {f"good-{number}" for number in range(len(POISONED))}

    async with worker_process(tmp_path, redis_server.url) as worker:
        with trio.fail_after(BOUND):
            await wait_until_all_ran(worker, tmp_path, good)
            for task_id in poisoned.values():
                await worker.output.wait_for(
                    rf"ERROR trio_bg: streaq worker \w+ set aside task {task_id}"
                )
            # The line is logged before streaq stores the failed result: wait for that
            # too, or a stop may come between them (the entry is then delivered again).
            async with app.tasks:
                keys = [app.tasks.results_key + task_id for task_id in poisoned.values()]
                while True:  # (Redis tells no one: it is asked)
                    if await app.tasks.redis.exists(keys) == len(keys):
                        break
                    await trio.sleep(0.05)
        assert await worker.stop() == 0

    output = worker.output.text
    assert sorted(line.split()[0] for line in ledger(tmp_path)) == sorted(good)
    assert SECRET not in output
    assert f"malformed: {len(POISONED)}" in output  # the worker's counters, at its shutdown
    # A known function is named; one of a record that names none is not guessed.
    assert re.search(rf"set aside task {poisoned['no time']} \({RECORD}\)", output)
    assert re.search(rf"set aside task {poisoned['a list']}: ", output)
    async with app.tasks:
        for shape, task_id in poisoned.items():
            raw = await app.tasks.redis.get(app.tasks.results_key + task_id)
            assert raw is not None, shape
            result = json.loads(raw)
            assert result["s"] is False, shape
            assert result["r"]["error"] == "StreaqError", shape
            assert result["r"]["message"].startswith("malformed task record: "), shape
            assert SECRET not in raw, shape
            assert not await app.tasks.redis.exists([app.tasks.task_key + task_id]), shape
        assert await app.tasks.queue_size() == 0


async def test_a_stream_entry_without_a_task_is_set_aside(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = streaq_app(monkeypatch, redis_server.url)
    async with app.tasks:
        stream = app.tasks.stream_key + app.tasks.priorities[-1]
        await app.record.enqueue("before")
        no_task = await app.tasks.redis.xadd(stream, {"enqueue_time": 0, "data": SECRET})
        bad_time = await app.tasks.redis.xadd(stream, {"task_id": "x", "enqueue_time": SECRET})
        await app.record.enqueue("after")

    async with worker_process(tmp_path, redis_server.url) as worker:
        with trio.fail_after(BOUND):
            await wait_until_all_ran(worker, tmp_path, {"before", "after"})
            for entry in (no_task, bad_time):
                await worker.output.wait_for(
                    rf"ERROR trio_bg: streaq worker \w+ set aside stream entry {entry} "
                )
        assert await worker.stop() == 0
    assert SECRET not in worker.output.text
    async with app.tasks:
        assert await app.tasks.redis.xlen(stream) == 0


@needs_redis
async def test_the_distributed_drill_plants_a_poisoned_record_and_passes() -> None:
    status, out, err = await run(
        "drill", "examples.drill_app:app", "--redis", "--workers=2", "--poison",
        *LOAD, "--grace-period=0.5", "--json",
    )  # fmt: skip
    assert status == 0, out + err
    result: dict[str, Any] = json.loads(out)
    assert result["verdict"] == "pass", result
    remote, poison = result["remote_tasks"], result["poison"]
    assert remote["claimed"] == remote["completed"] == 2 * result["web_server"]["answered"]
    assert 0 < poison["planted_after"] < result["web_server"]["signal_after"]
    assert poison["error"] == "StreaqError: malformed task record: no 'a'"
    assert [worker["exit_status"] for worker in result["workers"]] == [0, 0]
    assert f"drill: poisoned record {poison['task_id']} planted after" in err
    assert "drill: the poisoned record was set aside" in err
