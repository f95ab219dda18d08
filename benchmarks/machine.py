"""The machine a run happened on, for the top of the table and the results JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("trio", "hypercorn", "starlette", "quart-trio", "trio-bg")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def source_revision() -> str:
    """The commit the benchmarked trio_bg is at, and whether trio_bg/ has local changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--", "trio_bg")
    return commit + (" + uncommitted changes in trio_bg/" if dirty else "")


def describe() -> dict[str, object]:
    return {
        "trio_bg_revision": source_revision(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions(),
    }


def summary(info: dict[str, object]) -> str:
    packages = info["packages"]
    assert isinstance(packages, dict)
    listed = ", ".join(f"{name} {version}" for name, version in packages.items())
    return (
        f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"Python {info['python']}\npackages: {listed}\ntrio_bg at {info['trio_bg_revision']}"
    )
