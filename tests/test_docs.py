"""The repository explains itself: every reference to a Markdown file, and every relative link in the docs,
resolves to a file inside the repository (and a link's #anchor to a heading of that file)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Where references are looked for: the README, the docs, and every source a reader follows from them.
SOURCES = ["README.md", "docs", "w2s_theory", "paper_checks", "examples", "experiments", "tests", "Makefile",
           "pyproject.toml", ".ci"]
TEXT_SUFFIXES = {".md", ".py", ".toml", ".txt", ""}

#: The team's notes folder beside the repository, written so that this file does not mention it literally.
OUTSIDE = "/".join(("..", "shared"))

MD_MENTION = re.compile(r"(?<![\w/.-])((?:\.\.?/)*[\w./-]*[\w-]\.md)\b")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _files(root: Path):
    for entry in SOURCES:
        path = root / entry
        if path.is_file():
            yield path
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts \
                        and p.name != "test_docs.py":  # this file names dangling references on purpose
                    yield p


def _resolves(ref: str, source: Path, root: Path) -> Path | None:
    """The file ``ref`` names: relative to the file that mentions it or to the repository root, or, for a
    bare file name (``loss_comparison.md``), a file of that name anywhere in the repository."""
    for base in (source.parent, root):
        target = (base / ref).resolve()
        if target.is_file() and root in target.parents:
            return target
    if "/" not in ref:
        return next((p for p in root.rglob(ref) if ".venv" not in p.parts and ".git" not in p.parts), None)
    return None


def slug(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = unicodedata.normalize("NFKC", heading.strip().lower())
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*?)\s*#*$", md.read_text(), re.M)}


def dangling_references(root: Path = ROOT) -> list[str]:
    problems = []
    for path in _files(root):
        text = path.read_text(errors="replace")
        rel = path.relative_to(root)
        if OUTSIDE in text:
            problems.append(f"{rel}: points outside the repository ({OUTSIDE})")
        for m in MD_MENTION.finditer(text):
            ref = m.group(1)
            if ref.startswith(("http", "www.")) or _resolves(ref, path, root) is not None:
                continue
            if path.suffix == ".md" and re.search(r"\]\([^)]*" + re.escape(ref), text):
                continue  # a link; checked below with its anchor
            problems.append(f"{rel}: mentions {ref}, which is not in the repository")
        if path.suffix != ".md":
            continue
        for m in MD_LINK.finditer(text):
            link = m.group(1)
            if re.match(r"^[a-z]+:", link):
                continue  # an external URL
            file_part, _, anchor = link.partition("#")
            target = _resolves(file_part, path, root) if file_part else path
            if target is None and file_part.endswith("/") and (path.parent / file_part).is_dir():
                continue  # a link to a folder of the repository
            if target is None:
                problems.append(f"{rel}: link to {link}: no such file in the repository")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                problems.append(f"{rel}: link to {link}: no heading with that anchor in {target.name}")
    return problems


def test_every_markdown_reference_points_into_the_repository():
    problems = dangling_references()
    assert not problems, "dangling references:\n" + "\n".join(problems)


def test_the_reference_check_catches_a_dangling_reference(tmp_path):
    """The check can fail: a file that cites a notes file outside the repository, a link to a missing
    heading, and a pointer to the team's notes folder outside it are all reported; a link to a real heading
    is not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Title\nSee MISSING_NOTES.md and [x](page.md#no-such-heading), "
                                               "[y](page.md#title).\n")
    (tmp_path / "w2s_theory").mkdir()
    (tmp_path / "w2s_theory" / "mod.py").write_text(f'"""See {OUTSIDE}/notes."""\n')
    problems = dangling_references(tmp_path)
    assert any(OUTSIDE in p for p in problems)
    assert any("MISSING_NOTES.md" in p for p in problems)
    assert any("no-such-heading" in p for p in problems)
    assert not any("#title" in p for p in problems)


@pytest.mark.parametrize("heading, anchor", [
    ("The guarantee table", "the-guarantee-table"),
    ("Reverse KL on a convex head (Theorem 2)", "reverse-kl-on-a-convex-head-theorem-2"),
    ("Non-realizable reverse bound", "non-realizable-reverse-bound"),
])
def test_heading_anchors_follow_the_markdown_convention(heading, anchor):
    assert slug(heading) == anchor
