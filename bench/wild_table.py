"""Print the README's WILD tables from the committed JSON under bench/results/wild (no number typed by hand).

Usage: .venv/bin/python bench/wild_table.py [DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    ("WILD rel", "wild_reliability"),
    ("exact", "wild_exact_reliability"),
    ("retrieved", "reliability_retrieved"),
    ("WILD gen", "wild_generality"),
    ("exact", "wild_exact_generality"),
    ("WILD loc", "wild_locality"),
    ("echo", "echo"),
    ("echo unedited (own answer)", "echo_unedited_own"),
    ("subject loc", "subject_locality"),
    ("fluency", "fluency"),
    ("chat rel / gen", ("chat_reliability", "chat_generality")),
    ("chat retrieved", "chat_reliability_retrieved"),
    ("TF rel / gen / loc", ("reliability", "generality", "locality")),
)


def cell(row: dict, key) -> str:
    if isinstance(key, tuple):
        values = [row.get(k) for k in key]
        return (
            " / ".join("-" if v is None else f"{v:.3f}" for v in values) if any(v is not None for v in values) else "-"
        )
    value = row.get(key)
    return "-" if value is None else f"{value:.3f}"


def main(directory: str = "bench/results/wild") -> None:
    names = " | ".join(name for name, _ in COLUMNS)
    print(f"| data | method | T | n | edit scope / gate | {names} | commit | JSON |")
    print("|---" * (len(COLUMNS) + 7) + "|")
    for path in sorted(Path(directory).glob("quality-*.json")):
        doc = json.loads(path.read_text())
        name = doc["method"] + (f" ({doc['tag']})" if doc.get("tag") else "")
        # SCEN runs before 3dab972 wrote relation_gate for RECIPE's retriever only; SCEN's gate is on by default
        asked = str(doc.get("options", {}).get("relation_gate", True)).lower() not in ("false", "0", "no")
        gate = doc.get("relation_gate") or (doc["method"] == "scen" and asked)
        serving = f"{doc.get('edit_scope', 'text')} / {'on' if gate else 'off'}"
        for row in doc["rows"]:
            cells = " | ".join(cell(row, key) for _, key in COLUMNS)
            print(
                f"| {doc['data']} | {name} | {row['T']} | {row['n']} | {serving} | {cells} | "
                f"{doc.get('commit', '?')[:7]} | `{path.name}` |"
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
