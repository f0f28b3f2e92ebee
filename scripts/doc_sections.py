"""The scripts' one writer of generated doc sections: the text between two markers."""

from __future__ import annotations

import re
from pathlib import Path

import kvc


def replace_section(path: Path, begin: str, end: str, section: str) -> None:
    """Replace the text from ``begin`` to ``end`` (both included) by ``section``, which holds the two
    markers, or append ``section`` when the doc has no such text yet; written atomically."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    kvc.write_text(path, text.rstrip("\n") + "\n", force=True)
