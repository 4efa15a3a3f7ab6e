"""Markdown tables from bench/results/*.json, for README's performance section.

    python bench/report.py [cells_cpu rnn_cpu ...]
"""

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

COLUMNS = {
    "cells": ["cell", "gate", "B", "H", "native ms", "torch.nn ms", "eager ms", "compiled ms",
              "floor ms", "torch.nn/native", "eager/native", "compiled/native", "floor/native"],
    "rnn": ["rnn", "mode", "layers", "B", "H", "gate", "native ms", "torch.nn ms", "loop ms",
            "compiled ms", "sru ms", "floor ms", "torch.nn/native", "loop/native",
            "compiled/native", "sru/native", "native/floor", "native %peak", "loop %peak",
            "floor %peak"],
}


def fmt(v):
    if isinstance(v, float):
        return f"{v:.2f}" if v < 10 else f"{v:.0f}"
    return str(v)


def render(name):
    data = json.loads((RESULTS / f"{name}.json").read_text())
    m = data["machine"]
    cols = [c for c in COLUMNS[name.split("_")[0]] if any(c in r for r in data["rows"])]
    lines = [f"`{name}` ({data['when']}; {m['device']}, {m.get('gpu', m['cpu'])}, "
             f"{m['threads']} threads, torch {m['torch']}"
             + (f", multiply-add peak {m['fma peak GFLOP/s']} GFLOP/s" if m.get("fma peak GFLOP/s")
                else "") + ")", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in data["rows"]:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.stem for p in RESULTS.glob("*.json"))
    print("\n\n".join(render(n) for n in names))
