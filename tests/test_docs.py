"""Every Python example in README.md and on the docs site runs.

The fenced ```python blocks of a page run in order in one namespace (a page's later examples
may use its earlier ones' names). A block preceded by the line
``<!-- docs-test: skip (reason) -->`` is not run (one that needs big compute or several
processes); such blocks are counted and must give a reason. ``python tests/test_docs.py``
prints the counts. The API reference's ``::: twophase.NAME`` directives are checked against
``twophase.__all__`` here, so a renamed public name fails a fast test before the strict build.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
DIRECTIVE = re.compile(r"^:::\s*(?P<name>\S+)\s*$", re.MULTILINE)


class Example(NamedTuple):
    """One fenced Python block: its page, first line (1-based), code, and skip reason."""

    page: Path
    line: int
    code: str
    skip: str | None


def pages() -> list[Path]:
    """README.md, then every markdown page of the site (the notebooks have their own test)."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def examples(page: Path) -> list[Example]:
    """The page's ```python blocks, in order (indented blocks in lists included)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match["lang"]:
            i += 1
            continue
        indent, lang, start = match["indent"], match["lang"], i
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if lang == "python":
            body = [line[len(indent) :] for line in lines[start + 1 : i]]
            previous = next((s.strip() for s in reversed(lines[:start]) if s.strip()), "")
            skip = SKIP.match(previous)
            found.append(Example(page, start + 1, "\n".join(body), skip and skip["reason"]))
        i += 1
    return found


def all_examples() -> list[Example]:
    return [e for page in pages() for e in examples(page)]


def counts() -> tuple[int, int]:
    """(examples executed by the tests, examples in total)."""
    found = all_examples()
    return sum(e.skip is None for e in found), len(found)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


PAGES_WITH_CODE = [p for p in pages() if any(e.skip is None for e in examples(p))]


def test_extractor_finds_blocks_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\na = 1\n```\n\n<!-- docs-test: skip (big) -->\n```python\nb\n```\n"
        "- item\n\n  ```python\n  c = a + 1\n  ```\n```bash\nls\n```\n",
        encoding="utf-8",
    )
    found = examples(page)
    assert [(e.line, e.code, e.skip) for e in found] == [
        (2, "a = 1", None),
        (7, "b", "big"),
        (12, "c = a + 1", None),
    ]


def test_every_example_is_counted_and_most_run():
    executed, total = counts()
    assert total >= 10, "the docs lost their examples"
    assert executed >= 0.8 * total, f"only {executed} of {total} examples run"
    readme = examples(ROOT / "README.md")
    assert readme and all(e.skip is None for e in readme), "the README's example must run"


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_rel)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    for example in examples(page):
        if example.skip is not None:
            continue
        where = f"{_rel(page)}:{example.line}"
        try:
            code = compile(example.code, where, "exec")
            exec(code, namespace)
        except Exception as error:
            raise AssertionError(f"the example at {where} failed: {error!r}") from error


def test_api_reference_names_are_public_and_complete():
    twophase = pytest.importorskip("twophase")
    documented = []
    for page in sorted((DOCS / "api").glob("*.md")):
        documented += DIRECTIVE.findall(page.read_text(encoding="utf-8"))
    top = {n.removeprefix("twophase.") for n in documented if n.count(".") == 1}
    flax_helpers = {n for n in documented if n.startswith("twophase.flax.")}
    unknown = top - set(twophase.__all__)
    assert not unknown, f"the API reference names non-public or removed names: {unknown}"
    missing = set(twophase.__all__) - top
    assert not missing, f"public names missing from docs/api/*.md: {sorted(missing)}"
    assert len(documented) == len(set(documented)), "a name is documented twice"
    assert flax_helpers <= {
        "twophase.flax.nnx_value_fn",
        "twophase.flax.linen_value_fn",
        "twophase.flax.linen_apply_gradients",
    }
    assert all(n.count(".") == 1 or n in flax_helpers for n in documented)


def test_nav_pages_exist():
    nav = re.findall(r"(\S+\.(?:md|ipynb))\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert nav, "mkdocs.yml has no nav"
    for entry in nav:
        assert (DOCS / entry).is_file(), f"mkdocs.yml names a missing page: {entry}"
    listed = {DOCS / e for e in nav}
    unlisted = [_rel(p) for p in DOCS.rglob("*.md") if p not in listed]
    assert not unlisted, f"pages missing from the nav: {unlisted}"


SETUP_COMMANDS = [
    'pip install -e ".[experiments]" && python -m twophase',
    'pip install -e ".[dev]" && python -m pytest -n 2 --dist loadfile -m "not slow" -q',
]


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_second():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ") and lines[1:5] == ["", "```bash", *SETUP_COMMANDS]
    assert lines[5] == "```"
    assert len(lines) <= 150, f"the README has {len(lines)} lines"
    test_command = SETUP_COMMANDS[1].split(" && ")[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci, ".ci/run must run the README's test command"


def test_ci_installs_the_declared_floors():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for name in ("jax", "optax", "flax", "chex"):
        floor = re.search(rf'^\s*"{name}>=([\w.]+)",', pyproject, re.MULTILINE)
        assert floor, f"pyproject.toml declares no floor for {name}"
        assert f'"{name}=={floor[1]}"' in ci, f".ci/run does not test {name}=={floor[1]}"
    jax_floor = re.search(r'"jax>=([\w.]+)"', pyproject)[1]
    assert f'"jaxlib=={jax_floor}"' in ci


if __name__ == "__main__":
    executed, total = counts()
    for example in all_examples():
        if example.skip is not None:
            print(f"skipped {_rel(example.page)}:{example.line} ({example.skip})")
    print(f"{executed} of {total} examples executed by tests/test_docs.py")
    sys.exit(0)
