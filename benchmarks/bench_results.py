"""Where a benchmark's results go, one way for all of them: benchmarks/results/<name>.json and
<name>.md, the table printed, and with --update-docs the table placed between the
`<!-- BENCH:<name>:begin -->` and `<!-- BENCH:<name>:end -->` markers of a doc under docs/."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def publish(name: str, res: dict, md: str, doc: str | None = None, heading: str | None = None) -> None:
    """Write results/<name>.{json,md} and print the table; `doc` (e.g. "PERFORMANCE.md"): also
    replace the table between its <name> markers, first appending them under `heading` when the
    doc has none (without a heading, missing markers are an error naming them)."""
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{name}.md").write_text(md)
    print(md)
    if doc is None:
        return
    path = ROOT / "docs" / doc
    begin, end = f"<!-- BENCH:{name}:begin -->", f"<!-- BENCH:{name}:end -->"
    text = path.read_text()
    if begin not in text:
        if heading is None:
            raise ValueError(f"{path}: no {begin} marker to put the {name} table under")
        text += f"\n## {heading}\n\n{begin}\n{end}\n"
    a, b = text.index(begin) + len(begin), text.index(end)
    path.write_text(text[:a] + "\n" + md + text[b:])
