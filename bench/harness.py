"""Shared benchmark harness: timing (torch.utils.benchmark, median), machine facts, result JSON
and a printed table. Every comparison is measured in the same process, side by side."""

import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.utils.benchmark as tb

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn, min_run_time=0.5):
    """Median wall time of fn() in seconds (CUDA work synchronised by the Timer)."""
    fn()  # warm-up: lazy init, compilation, allocator
    # The Timer runs single-threaded unless told otherwise; time with the threads torch uses
    # (changing them would also invalidate torch.compile's guards).
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def machine(device="cpu"):
    info = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown"


def write(name, payload):
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def table(rows, columns):
    """Plain-text table of dict rows; floats printed with 3 significant digits."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
