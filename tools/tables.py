"""What the tools that keep a results table share: which rows a run computes (--only), the table's rows
in the JSON beside its Markdown, and the machine they were measured on."""
import json
import os
import platform

from cli import UserError


def fmt(value, digits: int = 3) -> str:
    """A number as a table cell with `digits` decimals; blank when not recorded."""
    return "" if value is None else f"{value:.{digits}f}"


def percent(value) -> str:
    """A share as a table cell: 0.0346 -> 3.5%; blank when not recorded."""
    return "" if value is None else f"{100 * value:.1f}%"


def choose(only: str | None, known, what: str) -> list:
    """The names an --only flag picks from `known`: all when not given, none for "none"."""
    names = [] if only == "none" else only.split(",") if only else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def load_rows(table: str) -> tuple:
    """(path, rows) of the JSON that sits beside a generated Markdown table (x.md -> x.json); no rows yet: [].
    Each row names the machine it was measured on (older files name it once, for all their rows)."""
    path = os.path.splitext(table)[0] + ".json"
    if not os.path.isfile(path):
        return path, []
    with open(path) as f:
        data = json.load(f)
    return path, [{"machine": data.get("machine"), **row} for row in data["rows"]]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPU threads"


def machines(rows: list) -> str:
    """Where a table's rows were measured, for its header."""
    return " and ".join(sorted({row["machine"] for row in rows}))
