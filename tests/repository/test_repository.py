"""The repository stands on its own: nothing tracked points outside it, and the docs' links work.

A clone on GitHub, an sdist and the package description see only tracked files, so a link or a
default path into a sibling folder of the checkout is broken everywhere but on one machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

# the sibling folder this project once read notes and a benchmark script from; built here so that
# this file does not contain the string it looks for
OUTSIDE = "/".join(("..", "shared"))

MARKDOWN_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list tracked files")
    proc = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=False, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout (an unpacked sdist?): no tracked files to check")
    return [REPO / name for name in proc.stdout.split("\0") if name]


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def links(doc: Path) -> list[str]:
    """Targets of the inline links and images in ``doc``, outside fenced code blocks."""
    return MARKDOWN_LINK.findall(FENCE.sub("", doc.read_text(encoding="utf-8")))


def anchors(doc: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", doc.read_text(encoding="utf-8")))}


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for path in tracked_files():
        if path.is_file() and OUTSIDE.encode() in path.read_bytes():
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], f"these tracked files name {OUTSIDE}: {offenders}"


def test_the_docs_exist_and_the_readme_links_each_of_them():
    docs = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert {"notebook.md", "design.md", "benchmarks.md", "synthetic-data.md"} <= set(docs)
    readme_targets = {t.partition("#")[0] for t in links(REPO / "README.md")}
    assert {f"docs/{name}" for name in docs} <= readme_targets


def test_every_relative_link_in_the_docs_leads_to_a_file_in_the_repository():
    broken = []
    for doc in documents():
        for target in links(doc):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            where = f"{doc.relative_to(REPO)}: ({target})"
            resolved = (doc.parent / path_part).resolve() if path_part else doc
            if REPO.resolve() not in (resolved, *resolved.parents):
                broken.append(f"{where} leaves the repository")
            elif not resolved.exists():
                broken.append(f"{where} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert broken == []


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("The embedded data is synthetic", "the-embedded-data-is-synthetic"),
        ("Compare any runs: `mer-compare`", "compare-any-runs-mer-compare"),
        ("Set up and run (fresh machine, Python 3.10+)", "set-up-and-run-fresh-machine-python-310"),
    ],
)
def test_slug_matches_githubs_heading_anchors(heading, anchor):
    assert slug(heading) == anchor


def test_the_link_check_sees_a_broken_link(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](https://example.org) [gone](missing.md#x)\n```\n[in code](nowhere.md)\n```\n")
    assert links(doc) == ["https://example.org", "missing.md#x"]


def test_the_wheel_lists_every_package_of_the_source_tree():
    # setuptools installs only the packages pyproject.toml names: a new subpackage left out of
    # the list works in an editable checkout and is missing from every wheel
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    src = REPO / "src"
    packages = {
        ".".join(init.parent.relative_to(src).parts) for init in (src / "mer_cli").rglob("__init__.py")
    }
    assert packages <= listed, sorted(packages - listed)
    assert "mer_cli.configs" in listed
