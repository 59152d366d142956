"""Plain-text tables for the scorers' terminal output."""

from __future__ import annotations


def fmt(x, digits: int) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def render(header: list[str], rows: list[list], digits: int = 2) -> str:
    """Columns padded to their widest cell; the first left-aligned, the rest right-aligned."""
    cells = [header] + [[fmt(x, digits) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
