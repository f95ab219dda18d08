"""The README and the docs: their links lead somewhere, and their code runs.

- Every relative link of README.md and docs/*.md names a file that exists (a page of the
  docs site, from the docs) and, for `page.md#anchor`, a heading of that page, by the slug
  MkDocs and GitHub give it.
- Every ```python block compiles (top-level `await` allowed). A block marked with
  `<!-- run -->` on the line before it also runs: each page's marked blocks in order, in
  one namespace that starts with `import trio, trio_bg`, in one child process. When a
  page's blocks leave a `BackgroundTaskMiddleware` named `app` (the quick start), a request
  goes through it with `trio_bg.testing.open_test_client`, and its tasks must complete.

`mkdocs build --strict` (in .ci/run) checks the same links again and the API reference;
these tests need no MkDocs.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
RUN_MARK = "<!-- run -->"


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    info: str
    source: str
    run: bool


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def split(page: Path) -> tuple[list[str], list[Block]]:
    """The page's prose lines (fenced blocks blanked out) and its fenced blocks."""
    prose: list[str] = []
    blocks: list[Block] = []
    lines = page.read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        previous = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
        body: list[str] = []
        start = i
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        blocks.append(
            Block(page, start + 1, m["info"].strip(), "\n".join(body) + "\n", previous == RUN_MARK)
        )
        prose.extend([""] * (i - start + 1))
        i += 1
    return prose, blocks


def slugs(page: Path) -> set[str]:
    """The anchors of the page's headings, as MkDocs (Python-Markdown's toc) and GitHub
    make them: inline markup dropped, punctuation dropped, lower case, spaces to '-'."""
    prose, _ = split(page)
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        text = CODE_SPAN.sub(lambda c: c[2], m[2])
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).replace("*", "")
        ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        mkdocs = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_text).strip().lower())
        github = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(mkdocs, 0)
        seen[mkdocs] = n + 1
        found |= {mkdocs, github} if n == 0 else {f"{mkdocs}_{n}", f"{github}-{n}"}
    return found


def links(page: Path) -> list[tuple[int, str]]:
    prose, _ = split(page)
    out = []
    for number, line in enumerate(prose, 1):
        line = CODE_SPAN.sub(lambda c: "x" * len(c[0]), line)  # `[a](b)` in code is no link
        out += [(number, m[1]) for m in LINK.finditer(line)]
    return out


def _link_cases() -> list[tuple[Path, int, str]]:
    return [(p, n, t) for p in PAGES for n, t in links(p) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize(
    ("page", "line", "target"),
    _link_cases(),
    ids=lambda v: _rel(v) if isinstance(v, Path) else str(v),
)
def test_relative_link_leads_somewhere(page: Path, line: int, target: str) -> None:
    where = f"{_rel(page)}:{line}: link {target!r}"
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{where}: no such file"
    if page.parent == DOCS:
        # MkDocs builds docs/ alone: a link out of it is broken on the site.
        assert dest.is_relative_to(DOCS), f"{where}: leaves docs/ (use a code span instead)"
    if anchor:
        assert dest.suffix == ".md", f"{where}: an anchor into a file that is not a page"
        assert anchor in slugs(dest), f"{where}: {_rel(dest)} has no heading #{anchor}"


def test_the_links_are_found() -> None:
    # The checker above would pass vacuously if LINK stopped matching.
    found = {t for _, _, t in _link_cases()}
    assert "docs/migration.md" in found
    assert "limits.md#per-task-options" in found


def test_every_page_is_on_the_site() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in DOCS.glob("*.md") if f": {p.name}" not in nav]
    assert not missing, f"not in mkdocs.yml's nav: {missing}"


def test_the_readme_stays_short_and_its_commands_true() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 10_240, "the README is for five minutes: move it to docs/"
    demo = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[drill]' && "
    demo += ".venv/bin/python -m trio_bg drill examples.drill_app:app"
    tests = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
    tests += ".venv/bin/python -m pytest"
    assert demo in readme and tests in readme
    assert (ROOT / "examples" / "drill_app.py").exists()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "\n.venv/bin/python -m pytest\n" in ci  # "the README's test command"


def _python_blocks() -> list[Block]:
    return [b for p in PAGES for b in split(p)[1] if b.info.split()[:1] == ["python"]]


@pytest.mark.parametrize("block", _python_blocks(), ids=lambda b: f"{_rel(b.page)}:{b.line}")
def test_python_block_compiles(block: Block) -> None:
    compile(
        block.source,
        f"{_rel(block.page)}:{block.line}",
        "exec",
        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        dont_inherit=True,
    )


RUNNER = r"""
import inspect, json, sys
import trio, trio_bg
from trio_bg.testing import open_test_client

async def drive(app):
    async with open_test_client(app) as client:
        response = await client.post("/signup")
        await client.drain()
        stats = client.stats
    assert client.report.all_completed, client.report
    return {"status": response.status_code, "accepted": stats.accepted,
            "completed": stats.completed}

results = {}
for page, blocks in json.load(sys.stdin).items():
    ns = {"__name__": "__docs__"}
    exec("import trio, trio_bg", ns)
    for line, source in blocks:
        code = compile(source, f"{page}:{line}", "exec",
                       flags=__import__("ast").PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
        if code.co_flags & inspect.CO_COROUTINE:
            async def main(code=code):
                await eval(code, ns)
            trio.run(main)
        else:
            exec(code, ns)
    app = ns.get("app")
    results[page] = (trio.run(drive, app)
                     if isinstance(app, trio_bg.BackgroundTaskMiddleware) else None)
print(json.dumps(results))
"""


def test_marked_blocks_run() -> None:
    runnable: dict[str, list[tuple[int, str]]] = {}
    for block in _python_blocks():
        if block.run:
            runnable.setdefault(_rel(block.page), []).append((block.line, block.source))
    assert {"README.md", "docs/index.md"} <= set(runnable), "the quick start must be marked"
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", RUNNER],
        input=json.dumps(runnable),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    quick_start = {"status": 201, "accepted": 2, "completed": 2}
    assert results["README.md"] == quick_start
    assert results["docs/index.md"] == quick_start
