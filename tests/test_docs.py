"""The documentation stands alone: every anchor of docs/methods.md cited in the repository resolves
to a heading (GitHub's slug rule) or an explicit anchor there, and nothing cites a specification
file outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
SCANNED = ("kvc", "kernels", "ci", "docs", "tests", "scripts", "benchmarks", "README.md", "pyproject.toml")

CITE = re.compile(r"docs/methods\.md#([\w-]+)")  # in any text file
LINK = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)")  # markdown link [text](path#anchor), in .md files
# Citations of the specification that once lived outside the repository. Assembled from pieces so
# that this file does not match its own patterns.
OUTSIDE = re.compile("|".join([
    r"\bspec" + r"\s+(?:sections?\s+)?\d",  # the section numbers of the outside spec
    "shared" + "/spec",
    "algorithms" + r"\.md",
    "\u00a7" + r"\s*\d",  # the section sign
]), re.IGNORECASE)


def text_files() -> list[Path]:
    """Every text file under the scanned roots (binary files and caches skipped)."""
    files = []
    for name in SCANNED:
        root = ROOT / name
        for path in [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []:
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            if "\0" not in text:
                files.append(path)
    return files


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than - and _
    removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Heading slugs (duplicates numbered -1, -2, ... as GitHub does) and explicit id/name anchors."""
    found, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        heading = re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not fenced:
            slug = github_slug(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    found.update(re.findall(r"<a\s+(?:id|name)=[\"']([^\"']+)[\"']", markdown))
    return found


def citations(path: Path, text: str) -> set[str]:
    """Anchors of docs/methods.md that one file cites, as text or as markdown links."""
    cited = set(CITE.findall(text))
    if path.suffix == ".md":
        for target, anchor in LINK.findall(text):
            resolved = (path.parent / target).resolve() if target else path.resolve()
            if resolved == METHODS.resolve():
                cited.add(anchor)
    return cited


def broken(files: dict[Path, str], targets: set[str]) -> list[tuple[str, str]]:
    """(file relative to the repository, anchor) of every citation that resolves to nothing."""
    return sorted((str(path.relative_to(ROOT)), anchor)
                  for path, text in files.items() for anchor in citations(path, text) - targets)


@pytest.mark.parametrize("heading,slug", [
    ("Methods: formulas, bit accounting and references", "methods-formulas-bit-accounting-and-references"),
    ("Bit rules (nominal, `--method NAME --bits B`)", "bit-rules-nominal---method-name---bits-b"),
    ("oracle-turboquant-mse", "oracle-turboquant-mse"),
    ("What it computes", "what-it-computes"),
    ("Gavish–Donoho, white noise", "gavishdonoho-white-noise"),
    ("[RoPE](#rope) and β", "rope-and-β"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_anchors_number_duplicates_and_skip_code():
    markdown = "# A b\n## A b\n```\n# not a heading\n```\n<a id=\"extra\"></a>\n### a-b\n"
    assert anchors(markdown) == {"a-b", "a-b-1", "a-b-2", "extra"}


def test_a_missing_anchor_is_reported():
    """The checker itself: a dangling citation is found, in code text and in markdown links."""
    doc = "docs/methods.md"  # cited below in pieces, so that this file's own scan stays clean
    files = {ROOT / "kvc" / "example.py": f"x = 1  # {doc}#no-such-anchor, {doc}#kivi.",
             ROOT / "docs" / "example.md": "[k](methods.md#kivi), [g](methods.md#gone), [s](#local)",
             ROOT / "README.md": f"[m]({doc}#readme-gone)"}
    assert broken(files, {"kivi"}) == [("README.md", "readme-gone"), ("docs/example.md", "gone"),
                                       ("kvc/example.py", "no-such-anchor")]


def test_every_methods_anchor_cited_resolves():
    targets = anchors(METHODS.read_text(encoding="utf-8"))
    files = {path: path.read_text(encoding="utf-8") for path in text_files()}
    cited = {anchor for path, text in files.items() for anchor in citations(path, text)}
    # the code cites the methods document throughout (a scan that found nothing would prove nothing)
    assert {"eoptshrinkq-rank-rule", "optimal-shrinkage", "bbp-threshold", "oracle-bits", "kivi"} <= cited
    assert broken(files, targets) == []


def test_nothing_cites_a_specification_outside_the_repository():
    assert OUTSIDE.search("see sp" + "ec 1.4") and OUTSIDE.search("Sp" + "ec section 8")
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            for path in text_files()
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if OUTSIDE.search(line)]
    assert hits == []
