"""The dashboard's page, rendered on the server from a look at the nursery
(`dashboard_data.look`): complete before any script runs, its forms working without
one. The page's script (``dashboard_assets/dashboard.js``) then keeps it live from the
same look, fetched again, which the page also carries, for the script to start from.
Everything shown is escaped: names, messages, errors and arguments are user data."""

from __future__ import annotations

import json
from html import escape
from typing import Any, NamedTuple

from .dashboard_data import COUNTED, ENDED_STATES, SERIES, Cell, View, seconds

PERCENTILES = ("Run p50", "Run p95", "Run p99", "Wait p50", "Wait p95", "Wait p99")

TABLES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "live": (
        "Running and pending",
        ("Name", "Id", "State", "Age", "Attempt", "Progress", "Message"),
        "No task is running or waiting.",
    ),
    "ended": (
        "Recently ended",
        ("Name", "Id", "Outcome", "Ended", "Duration", "Attempt", "Error"),
        "No task has ended yet (or none matches the filter).",
    ),
    "names": (
        "Times by name",
        ("Name", "Ended", "Failed", *PERCENTILES),
        "Nothing recorded yet: times are recorded from the dashboard's first look on.",
    ),
    "dead": (
        "Dead letters",
        ("Name", "Row", "Id", "Attempts", "Error", "Added"),
        "No dead letters.",
    ),
}
"""Per table: its heading, its columns (before the optional ones), the text of an
empty one."""

SYSTEM = {
    "state": "State",
    "grace_period": "Grace period",
    "running": "Running slots",
    "pending": "Pending room",
    "oldest_pending": "Oldest pending",
    "threads": "Worker threads",
    "backlog": "Journal backlog",
    "outbox": "Outbox",
    "dead": "Dead letters",
    "redis": "Redis",
}

CHART_HEIGHT = 40
"""The chart's height in its own units (its width: one per slot)."""


class Context(NamedTuple):
    """What each part of the page needs besides the look: where the dashboard is
    mounted, the token its forms send, how it shows things, and the look's time."""

    root: str
    token: str
    view: View
    now: float


def render(
    state: dict[str, Any], *, root: str, token: str, etag: str, view: View, assets: str
) -> str:
    """The whole page: ``root`` is where the dashboard is mounted, ``token`` the
    token its forms send, ``etag`` that of ``state``, ``assets`` the version of the
    script and style sheet (their cache key)."""
    r = escape(root)
    context = Context(root, token, view, state["now"])
    sections = "\n".join(_table(key, state, context) for key in ("live", "ended", "names", "dead"))
    embedded = json.dumps({"etag": etag, "state": state}).replace("<", "\\u003c")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="referrer" content="same-origin">
<title>Background tasks · trio_bg</title>
<link rel="stylesheet" href="{r}/dashboard.css?v={assets}">
<script src="{r}/dashboard.js?v={assets}" defer></script>
</head>
<body data-root="{r}" data-token="{escape(token)}">
<header>
<h1>Background tasks</h1>
<p><span id="live" role="status">{_state_line(state)}</span></p>
</header>
<main>
{_outcomes(state)}
{_system(state)}
{sections}
</main>
<p id="notice" role="status" aria-live="polite"></p>
<script type="application/json" id="look">{embedded}</script>
</body>
</html>
"""


def _state_line(state: dict[str, Any]) -> str:
    return "Draining: new tasks are refused" if state["draining"] else "Serving"


def _label(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _outcomes(state: dict[str, Any]) -> str:
    counts = "".join(
        f'<div class="count c-{key}"><dt>{_label(key)}</dt>'
        f'<dd data-count="{key}">{state["counts"][key]}</dd></div>'
        for key in COUNTED
    )
    rates = " · ".join(
        f'<span data-rate="{key}">{count}</span> {key}' for key, count in state["rates"].items()
    )
    legend = "".join(f'<li class="s-{key}">{key}</li>' for key in SERIES)
    return f"""<section aria-labelledby="h-outcomes">
<h2 id="h-outcomes">Outcomes</h2>
<dl class="counts">{counts}</dl>
<p>Last minute: {rates}.</p>
<figure>
{chart_svg(state["chart"])}
<figcaption>Tasks ended per {state["chart"]["step"]:.0f} s over the last
{state["chart"]["slots"] * state["chart"]["step"] / 60:.0f} minutes, now at the right
(tallest bar: <span data-chart-max>{state["chart"]["max"]}</span>).
<ul class="legend">{legend}</ul></figcaption>
</figure>
</section>"""


def chart_svg(chart: dict[str, Any]) -> str:
    """The chart: a stacked bar per slot with any ended task (as the script draws it)."""
    rects = []
    top = max(chart["max"], 1)
    for slot, *values in chart["bars"]:
        y = float(CHART_HEIGHT)
        for series, value in zip(SERIES, values, strict=True):
            if value:
                height = value / top * (CHART_HEIGHT - 2)
                y -= height
                rects.append(
                    f'<rect class="s-{series}" x="{slot + 0.1:g}" y="{y:.2f}" '
                    f'width="0.8" height="{height:.2f}"></rect>'
                )
    return (
        f'<svg class="chart" viewBox="0 0 {chart["slots"]} {CHART_HEIGHT}" '
        f'preserveAspectRatio="none" aria-hidden="true"><g>{"".join(rects)}</g></svg>'
    )


def _table(key: str, state: dict[str, Any], context: Context) -> str:
    title, columns, empty = TABLES[key]
    table, view = state["tables"][key], context.view
    if key == "dead" and view.show_arguments:
        columns += ("Arguments",)
    if key in ("live", "dead") and not view.read_only:
        columns += ("Actions",)
    head = "".join(f'<th scope="col">{column}</th>' for column in columns)
    rows = "\n".join(_row(row, columns, context) for row in table["rows"]) or (
        f'<tr class="empty"><td colspan="{len(columns)}">{empty}</td></tr>'
    )
    tools = _filter(state["names"], context) if key == "ended" else ""
    return f"""<section aria-labelledby="h-{key}" class="wide">
<h2 id="h-{key}">{title}</h2>
{tools}<div class="scroll" role="region" aria-labelledby="h-{key}" tabindex="0">
<table>
<thead><tr>{head}</tr></thead>
<tbody data-table="{key}" data-empty="{escape(empty)}">
{rows}
</tbody>
</table>
</div>
<p class="note" data-note="{key}">{escape(table["note"])}</p>
</section>"""


def _filter(names: list[str], context: Context) -> str:
    view = context.view
    known = "".join(f'<option value="{escape(name)}"></option>' for name in names)
    outcomes = "".join(
        f'<option value="{state}"{" selected" if view.outcome == state else ""}>'
        f"{_label(state)}</option>"
        for state in ENDED_STATES
    )
    return f"""<form class="filter" method="get" action="{escape(context.root)}/">
<label>Name <input name="name" list="names" value="{escape(view.name or "")}" size="18"></label>
<label>Outcome <select name="outcome"><option value="">Any</option>{outcomes}</select></label>
<button>Filter</button>
<datalist id="names">{known}</datalist>
</form>
"""


def _row(row: dict[str, Any], columns: tuple[str, ...], context: Context) -> str:
    first, *rest = row["cells"]
    cells = f'<th scope="row">{escape(str(first))}</th>' + "".join(
        cell(value, label, context) for value, label in zip(rest, columns[1:], strict=True)
    )
    return f'<tr data-key="{escape(row["key"])}">{cells}</tr>'


def cell(value: Cell, label: str, context: Context) -> str:
    """One table cell (see `dashboard_data.Cell`) under the column ``label``, as
    ``<td>`` HTML (a phone shows the label beside it: its rows are cards there)."""
    attributes, inner = _cell(value, context)
    return f'<td data-label="{escape(label)}"{attributes}>{inner}</td>'


def _cell(value: Cell, context: Context) -> tuple[str, str]:
    """A cell's attributes (but its label) and its content, as HTML."""
    if value is None:
        return "", ""
    if not isinstance(value, dict):
        return "", escape(str(value))
    if "since" in value:
        since = value["since"]
        return ("", "") if since is None else (f' data-since="{since}"', age(since, context.now))
    if "badge" in value:
        state = escape(value["badge"])
        return "", f'<span class="badge b-{state}">{state.replace("_", " ")}</span>'
    if "id" in value:
        return "", f'<code title="{escape(value["id"])}">{escape(value["id"][:8])}</code>'
    if "text" in value:
        return ' class="text"', escape(value["text"])
    if "code" in value:
        return "", f"<code>{escape(value['code'])}</code>"
    if "progress" in value:
        percent = f"{value['progress'] * 100:.0f} %"
        bar = f'<progress max="1" value="{value["progress"]}" aria-hidden="true"></progress>'
        return "", f"{bar} {percent}"
    forms = "".join(_action(action, id, label, context) for action, id, label in value["do"])
    return ' class="do"', forms


def _action(action: str, id: str, label: str, context: Context) -> str:
    confirm = f' data-confirm="{escape(label)}?"' if action == "purge" else ""
    return (
        f'<form method="post" action="{escape(context.root)}/{action}" class="act"{confirm}>'
        f'<input type="hidden" name="token" value="{escape(context.token)}">'
        f'<input type="hidden" name="id" value="{escape(id)}">'
        f'<button class="{action}" aria-label="{escape(label)}">{action.capitalize()}</button>'
        "</form>"
    )


def _system(state: dict[str, Any]) -> str:
    items = "".join(
        f'<div><dt>{label}</dt><dd data-system="{key}">{escape(state["system"][key])}</dd></div>'
        for key, label in SYSTEM.items()
    )
    return f"""<section aria-labelledby="h-system">
<h2 id="h-system">System</h2>
<dl class="system">{items}</dl>
</section>"""


def age(since: float | None, now: float) -> str:
    """How long ago ``since`` was (as the script keeps it)."""
    return "" if since is None else seconds(max(0.0, now - since))
