"""Write benchmark results: JSON + Markdown table (+ PNG plots by the caller)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from facetron.atomic import atomic_write_bytes, atomic_write_json
from facetron.benchmarks.machine import machine_info, machine_tag
from facetron.paths import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def result_stem(name: str, tag: str | None = None) -> Path:
    date = _dt.date.today().isoformat()
    return RESULTS_DIR / f"{date}-{tag or machine_tag()}-{name}"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    return head + body


def write_result(name: str, result: dict, markdown: str, tag: str | None = None, out_dir: Path | None = None) -> Path:
    """``<results>/<date>-<machine>-<name>.json`` and ``.md``; returns the JSON path."""
    stem = result_stem(name, tag) if out_dir is None else Path(out_dir) / result_stem(name, tag).name
    doc = {"benchmark": name, "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info()}
    doc.update(result)
    json_path = atomic_write_json(stem.with_suffix(".json"), doc)
    atomic_write_bytes(stem.with_suffix(".md"), (f"# {name}\n\n" + markdown).encode())
    return json_path
