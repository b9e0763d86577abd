"""Shared output of the benchmarks: JSON and figures under bench/results, tables in docs/."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-core.md"
DOC_TITLE = "# Core benchmarks\n\nWritten by `bench/fidelity.py` and `bench/compaction_speed.py`.\n"


def parse_indices(spec: str) -> list[int]:
    """ "0-9" or "0,3,5-7" -> sorted unique indices."""
    out: set[int] = set()
    for part in spec.split(","):
        start, _, end = part.strip().partition("-")
        out.update(range(int(start), int(end or start) + 1))
    return sorted(out)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 decimals."""

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cell(v) for v in line) + " |" for line in lines)


def write_json(name: str, data: Any) -> Path:
    """bench/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


RESUME_HELP = "keep the articles bench/results/<tag>.json already holds for the same settings"


def saved_runs(
    tag: str, config: dict[str, Any], same: Sequence[str], runs: str, index: str
) -> dict[int, dict[str, Any]]:
    """Per-article runs that bench/results/<tag>.json holds from an earlier run with the same
    `config[key]` for every key in `same` (a long run goes on where it stopped); exits on
    other settings. `runs` names the file's list of runs, `index` their article field."""
    path = RESULTS / f"{tag}.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    asked = json.loads(json.dumps(config))  # tuples as the file holds them
    if any(saved["config"].get(key) != asked.get(key) for key in same):
        raise SystemExit(f"{path} holds a run of other settings: choose another --tag")
    return {run[index]: run for run in saved[runs]}


def update_doc(section: str, markdown: str, doc: Path = DOC, title: str = DOC_TITLE) -> None:
    """Replace (or append) the doc's block between this section's markers; a new doc starts
    with `title`."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = doc.read_text() if doc.is_file() else title
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
