"""README.md and docs/ are self-contained and cannot point at things that are gone.

Every link must lead to a file of this repository (no web addresses: the docs describe this
code, and the repository must read the same offline). File paths written as code
(`` `producer/keys.py` ``, `` `tests/x.py::test_name` ``) must exist too, with the named
test or function in them, so a rename or a move shows up here rather than in a reader's
dead end.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
AUTOLINK = re.compile(r"<([A-Za-z][A-Za-z0-9+.-]*:[^>\s]*)>")
BARE_URL = re.compile(r"(?:https?|ftp)://\S+|www\.\S+", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# A repository path in a code span: `dir/.../file.ext`, optionally `::name` or `:name`.
REPO_PATH = re.compile(r"^([A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+\.[A-Za-z0-9]+)(?:::?(\w+))?$")
NAME_ONLY = re.compile(r"^::(\w+)$")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and code spans."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        lines.append("" if fenced else CODE_SPAN.sub("", line))
    return "\n".join(lines)


def links(text: str) -> list[str]:
    prose = _prose(text)
    found = INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose) + AUTOLINK.findall(prose)
    without_links = AUTOLINK.sub("", INLINE_LINK.sub("", REFERENCE_LINK.sub("", prose)))
    return found + BARE_URL.findall(without_links)


def link_problem(doc: Path, target: str) -> str | None:
    """Why ``target`` (a link in ``doc``) is not a file of this repository, else None."""
    if SCHEME.match(target) or target.startswith("//") or target.lower().startswith("www."):
        return "points outside the repository"
    path = target.split("#", 1)[0].split("?", 1)[0]
    if not path:
        return None  # an anchor on the same page
    resolved = (doc.parent / path).resolve()
    if not resolved.is_relative_to(REPO):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file"
    return None


def code_paths(text: str) -> list[tuple[str, str | None]]:
    """(repository path, name or None) for each code span naming a file under one of the
    repository's top-level folders; ``::name`` alone refers to the last path on its line."""
    out: list[tuple[str, str | None]] = []
    top = {p.name for p in REPO.iterdir() if p.is_dir()}
    for line in text.splitlines():
        last: str | None = None
        for _, span in CODE_SPAN.findall(line):
            span = span.strip()
            match, name_only = REPO_PATH.match(span), NAME_ONLY.match(span)
            if match and match.group(1).split("/")[0] in top:
                last = match.group(1)
                out.append((last, match.group(2)))
            elif name_only and last is not None:
                out.append((last, name_only.group(1)))
    return out


def test_the_scanners_see_every_kind_of_link() -> None:
    text = (
        'See [a](docs/a.md#x), ![img](pic.png "t"), <https://example.org>, www.example.org\n'
        "and https://example.com/page.\n[ref]: ../outside.md\n"
        "`not [a link](b.md)` and `tests/test_docs.py::links`, `::code_paths`\n"
        "```\n[in code](c.md) https://in.code\n```\n"
    )
    assert sorted(links(text)) == sorted(
        ["docs/a.md#x", "pic.png", "https://example.org", "../outside.md",
         "www.example.org", "https://example.com/page."]
    )  # fmt: skip
    assert code_paths(text) == [
        ("tests/test_docs.py", "links"), ("tests/test_docs.py", "code_paths")
    ]  # fmt: skip
    doc = REPO / "README.md"
    assert link_problem(doc, "https://example.org") == "points outside the repository"
    assert link_problem(doc, "../README.md") == "points outside the repository"
    assert link_problem(doc, "docs/nothing-here.md") == "no such file"
    assert link_problem(doc, "docs/design.md#the-flow") is None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_at_files_of_the_repository(doc: Path) -> None:
    problems = [
        f"{target}: {why}"
        for target in links(doc.read_text())
        if (why := link_problem(doc, target)) is not None
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_file_paths_in_the_docs_exist(doc: Path) -> None:
    problems = []
    for path, name in code_paths(doc.read_text()):
        file = REPO / path
        if not file.is_file():
            problems.append(f"{path}: no such file")
        elif name is not None and not re.search(
            rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^{name}\s*[:=]",
            file.read_text(errors="replace"),
            re.MULTILINE,
        ):
            problems.append(f"{path}: nothing named {name}")
    assert not problems, "\n".join(problems)


def test_readme_links_the_design_and_the_protocol() -> None:
    targets = {t.split("#", 1)[0] for t in links((REPO / "README.md").read_text())}
    assert {"docs/design.md", "docs/protocol.md"} <= targets


def test_license_is_the_one_pyproject_declares() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'license = { text = "Apache-2.0" }' in pyproject
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text
