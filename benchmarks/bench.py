"""Run trio_bg's benchmarks and print one table per benchmark.

``bash benchmarks/run`` sets up the environment and calls this; ``python -m
benchmarks.bench --help`` lists the options. The exit status is non-zero only when
a run failed or a background task was lost, never for slowness.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import (
    bench_dashboard,
    bench_handles,
    bench_http,
    bench_journal,
    bench_memory,
    bench_metrics,
    bench_shutdown,
    bench_spawn,
    bench_streaq,
    bench_threads,
    machine,
    pinning,
)
from .load import LoadError, choose
from .section import Section

RESULTS = Path(__file__).with_name("results")
BENCHMARKS = (
    "overhead",
    "anchors",
    "spawn",
    "memory",
    "shutdown",
    "journal",
    "threads",
    "streaq",
    "handles",
    "metrics",
    "dashboard",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (about a minute)")
    parser.add_argument("--reps", type=int, help="reps per benchmark (default 9, quick 2)")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated, of {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--generator", choices=["auto", "wrk", "trio"], default="auto")
    parser.add_argument(
        "--connections",
        type=int,
        default=32,
        help="HTTP connections (32; the threads benchmark uses 32 and 50)",
    )
    parser.add_argument(
        "--duration", type=int, help="whole seconds of load per app per rep (2, anchors 1; quick 1)"
    )
    parser.add_argument("--no-json", action="store_true", help="do not write benchmarks/results/")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.duration is not None and args.duration < 1:
        parser.error("--duration must be at least 1 (wrk takes whole seconds)")
    return args


def quiet_trio_bg_logs() -> None:
    """Shutdown reports name every cancelled task: format them, but print nothing."""
    logger = logging.getLogger("trio_bg")
    logger.addHandler(logging.StreamHandler(open(os.devnull, "w")))  # noqa: SIM115
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    quick = args.quick
    reps = args.reps or (2 if quick else 9)
    selected = set(args.only.split(","))
    only = [name for name in BENCHMARKS if name in selected]
    server_cpu, load_cpu = pinning.cpus()
    try:
        generator = choose(args.generator, load_cpu)
    except LoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    info = machine.describe()
    quiet_trio_bg_logs()

    def http(duration: int) -> bench_http.HttpSettings:
        return bench_http.HttpSettings(
            generator=generator,
            connections=args.connections,
            duration=args.duration or (1 if quick else duration),
            reps=reps,
            server_cpu=server_cpu,
        )

    in_process = 20_000 if quick else 100_000
    runs: dict[str, Callable[[], Section | list[Section]]] = {
        "overhead": lambda: bench_http.overhead(http(2)),
        "anchors": lambda: bench_http.anchors(http(1), quart=bench_http.quart_problem()),
        "spawn": lambda: bench_spawn.run(reps=reps, tasks=in_process),
        "memory": lambda: bench_memory.run(reps=1, tasks=in_process),
        "handles": lambda: bench_handles.run(reps=reps, tasks=20_000 if quick else in_process),
        "shutdown": lambda: bench_shutdown.run(reps=reps, tasks=10_000),
        "journal": lambda: bench_journal.run(
            http(2),
            reps=reps,
            tasks=5_000 if quick else 20_000,
            rows=in_process,
            memory_reps=1 if quick else min(reps, 3),
            cpu=load_cpu,
        ),
        "threads": lambda: bench_threads.run(http(2), reps=reps, tasks=in_process, cpu=load_cpu),
        "metrics": lambda: bench_metrics.run(http(4)),
        "dashboard": lambda: bench_dashboard.run(reps=reps, requests=50 if quick else 200),
        "streaq": lambda: bench_streaq.run(
            http(2),
            reps=reps,
            tasks=5_000 if quick else 20_000,
            end_to_end_tasks=2_000 if quick else 10_000,
            server_cpu=server_cpu,
            load_cpu=load_cpu,
        ),
    }

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    pinned = (
        f"server on CPU {server_cpu}, load generator on CPU {load_cpu}"
        if server_cpu is not None
        else "not pinned (needs taskset and 2 cores)"
    )
    print(f"trio_bg benchmarks, {now}{' (quick)' if quick else ''}")
    print(machine.summary(info))
    print(f"load generator: {generator.name}, {args.connections} connections; pinning: {pinned}")
    print(f"reps: {reps}; ratios are medians of per-rep paired ratios\n", flush=True)

    sections: dict[str, list[Section]] = {}
    for name in only:
        if name in ("spawn", "memory", "shutdown", "handles", "dashboard") and load_cpu is not None:
            os.sched_setaffinity(0, {load_cpu})  # in-process: keep to one core too
        result = runs[name]()
        sections[name] = result if isinstance(result, list) else [result]
        for section in sections[name]:
            print(section.render() + "\n", flush=True)

    failures = [f for parts in sections.values() for section in parts for f in section.failures]
    elapsed = time.monotonic() - started
    print(
        f"done in {elapsed:.0f} s; "
        + (f"{len(failures)} FAILURE(S)" if failures else "no failures")
    )
    if not args.no_json:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
        document = {
            "machine": info,
            "generator": generator.name,
            "connections": args.connections,
            "reps": reps,
            "quick": quick,
            "argv": sys.argv[1:] if argv is None else argv,
            "seconds": elapsed,
            "failures": failures,
            "benchmarks": {
                name: parts[0].data if len(parts) == 1 else {s.title: s.data for s in parts}
                for name, parts in sections.items()
            },
        }
        path.write_text(json.dumps(document, indent=2, default=str))
        print(
            f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
