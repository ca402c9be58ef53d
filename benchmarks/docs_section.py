"""docs/benchmarks.md, section by section: each benchmark script writes its own ``## ...`` section with its results."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(text: str, heading: str | None = None, docs: Path = DOCS) -> None:
    """Put ``text`` in as the section ``heading`` (default: ``text``'s first line) of ``docs``: it replaces an
    earlier section of that heading, up to the next ``## `` heading, else it is appended at the end."""
    heading = heading or text.splitlines()[0]
    existing = docs.read_text() if docs.exists() else "# Benchmarks\n"
    start = ("\n" + existing).find("\n" + heading + "\n")   # the heading as a whole line
    if start >= 0:
        end = existing.find("\n## ", start + len(heading))
        updated = existing[:start] + text.rstrip("\n") + "\n" + (existing[end:] if end >= 0 else "")
    else:
        updated = existing.rstrip("\n") + "\n\n" + text
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(updated)
