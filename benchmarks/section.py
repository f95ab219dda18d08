"""What each benchmark hands back to the driver: a titled table, notes, failures, data."""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

WIDTH = 100
"""Notes are wrapped to this many columns."""


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(met: bool, target: str) -> str:
    return f"{target} {'met' if met else 'MISSED'}"


class Table:
    """A plain-text table: the first column left-aligned, the others right-aligned."""

    def __init__(self, header: Sequence[str]) -> None:
        self.header = list(header)
        self.rows: list[list[str]] = []

    def add(self, *cells: str) -> None:
        if len(cells) > len(self.header):
            raise ValueError(f"{len(cells)} cells for {len(self.header)} columns")
        self.rows.append([*cells, *[""] * (len(self.header) - len(cells))])

    def render(self, indent: str = "  ") -> str:
        widths = [
            max(len(row[i]) for row in [self.header, *self.rows]) for i in range(len(self.header))
        ]

        def line(row: list[str]) -> str:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
            return (indent + "  ".join(cells)).rstrip()

        rule = indent + "  ".join("-" * width for width in widths)
        return "\n".join([line(self.header), rule, *map(line, self.rows)])


@dataclass
class Section:
    title: str
    table: Table | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """Runs that failed or lost tasks: any of these makes the suite exit non-zero."""
    data: dict[str, Any] = field(default_factory=dict)
    """What goes into the results JSON."""

    def render(self) -> str:
        parts = [self.title]
        if self.table is not None:
            parts.append(self.table.render())
        parts += [
            textwrap.fill(note, WIDTH, initial_indent="  ", subsequent_indent="  ")
            for note in self.notes
        ]
        parts += [f"  FAILED: {failure}" for failure in self.failures]
        return "\n".join(parts)
