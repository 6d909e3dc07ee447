"""Reads the tables of ``benchmarks/results/*.md`` for the guides (run at build time, so
the pages always show the committed numbers)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def table(filename: str, section: str, columns: list[str], rows: list[str] | None = None) -> str:
    """The markdown table under the heading starting with ``section`` in ``filename``,
    keeping ``columns`` (by header text, ``"header -> label"`` to rename; a repeated header
    is taken in order) and ``rows`` (by first cell; default all)."""
    lines = (RESULTS / filename).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and section in line)
    body: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("#") or (body and not line.startswith("|")):
            break  # the first table of the section only
        if line.startswith("|"):
            body.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, data = body[0], [r for r in body[2:]]
    picked, labels, used = [], [], set()
    for col in columns:
        name, _, label = col.partition(" -> ")
        free = [j for j, h in enumerate(header) if h == name and j not in used]
        if not free:
            raise ValueError(f"no column {name!r} in {filename} / {section}: {header}")
        i = free[0]
        used.add(i)
        picked.append(i)
        labels.append(label or name)
    out = ["| " + " | ".join(labels) + " |", "|" + "---|" * len(picked)]
    for r in data:
        if rows is None or r[0] in rows:
            out.append("| " + " | ".join(r[i] for i in picked) + " |")
    if len(out) == 2:
        raise ValueError(f"no rows of {rows} in {filename} / {section}")
    return "\n".join(out)
