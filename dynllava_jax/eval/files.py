"""Reading the JSON / JSONL files the scorers take, with errors a user can act on."""

from __future__ import annotations

import json
from pathlib import Path


class UserError(Exception):
    """A problem with the user's files or flags: the CLI prints it as one ``error:`` line, exit 2."""


def read_json(path):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}: not JSON ({e.msg})") from None


def read_jsonl(path, required=()) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped); each must be an object with ``required`` keys."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []  # split on "\n" only, as iterating an open file does (not on U+2028 and kin)
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{p}:{n}: not a JSON object")
        missing = [k for k in required if k not in row]
        if missing:
            raise UserError(f"{p}:{n}: no {', '.join(repr(k) for k in missing)} field")
        rows.append(row)
    return rows


def ratio(num, den):
    """num / den, or None where the official script would divide by zero."""
    return num / den if den else None
