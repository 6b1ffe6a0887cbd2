"""The README is a front door and the reference lives in docs/: links there must not rot.

A relative link names a file that exists (no anchors: headings get renamed and GitHub's anchor rules
are not ours to check), every page under docs/ is reachable from the README, and the README stays
short enough to read first.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
# the other hand-written pages, which link into docs/ too
OTHER_PAGES = [ROOT / "train" / "README.md", ROOT / "export" / "README.md", ROOT / "benchmarks" / "RESULTS.md"]
MAX_README_LINES = 220

# [text](target) outside code; the target ends at the first space or closing parenthesis
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(page: Path) -> list[str]:
    """The relative link targets of a markdown page, code blocks and spans left out.

    Args:
        page: a markdown file.

    Returns:
        Every link target that is not a URL (no scheme such as ``https:`` or ``mailto:``).
    """
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", [README, *DOC_PAGES, *OTHER_PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_to_files(page: Path):
    links = relative_links(page)
    with_anchor = [t for t in links if "#" in t]
    assert not with_anchor, f"{page.name}: link to a file, not an anchor: {with_anchor}"
    missing = [t for t in links if not (page.parent / t).exists()]
    assert not missing, f"{page.name}: links to files that do not exist: {missing}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t).resolve() for t in relative_links(README)}
    unlinked = [p.name for p in DOC_PAGES if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_stays_a_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < MAX_README_LINES, f"README.md is {lines} lines; move reference text to docs/"


def test_link_finder_skips_code_and_urls(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("[a](a.md) `[b](b.md)` [c](https://x.org/c.md)\n```\n[d](d.md)\n```\n[e](docs/e.md)\n")
    assert relative_links(page) == ["a.md", "docs/e.md"]
