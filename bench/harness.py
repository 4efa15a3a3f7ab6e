"""Shared benchmark harness: interleaved timing (median), machine facts, result JSON and a printed
table. Every comparison is measured in the same process, side by side."""

import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import mapopt_native

RESULTS = Path(__file__).resolve().parent / "results"

# float32 means float32 for every candidate: cuDNN's RNNs (and convolutions) default to TF32 tensor
# cores while cuBLAS matrix products default to full float32, which would compare unlike math.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def compare(fns, min_rounds=5, min_run_time=1.0):
    """Median seconds per call of each fn in the dict `fns`, measured side by side.

    Every round calls each fn once (several times when one call is under a millisecond) in an
    order that rotates from round to round, so slow drifts of a shared machine (other tenants,
    clocks) hit every candidate alike instead of whichever happened to run then."""
    names = list(fns)
    reps = {}
    for name in names:  # warm-up: lazy init, compilation, allocator; sizes the repetitions
        _sync()
        t = time.perf_counter()
        fns[name]()
        _sync()
        reps[name] = max(1, int(1e-3 / max(time.perf_counter() - t, 1e-9)))
    samples = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < min_run_time:
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            _sync()
            t = time.perf_counter()
            for _ in range(reps[name]):
                fns[name]()
            _sync()
            samples[name].append((time.perf_counter() - t) / reps[name])
        rounds += 1
    return {name: statistics.median(v) for name, v in samples.items()}


def linear(x, w, b=None):
    """x wᵀ + b by the backend the native ops use for it: oneDNN for float32 on the CPU (where
    torch has it; csrc/cpu/onednn_linear.h), ATen's mm elsewhere. The matmul floors use it so
    that they measure the same products the native code runs."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return torch.nn.functional.linear(x, w, b)


def matmul(a, b):
    """a b by the backend the native layers use for their products over all steps (weight and
    input gradients): oneDNN for float32 on the CPU where it reads a and b in place
    (csrc/cpu/onednn_linear.h), ATen's mm elsewhere."""
    if a.device.type == "cpu":
        return mapopt_native._C.cpu_matmul(a, b)
    return torch.mm(a, b)


def pack(w, batch):
    """w pre-packed for linear() over many calls (oneDNN's layout on the CPU; as is elsewhere)."""
    if w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._reorder_linear_weight(w, batch)
    return w


def machine(device="cpu"):
    info = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
    }
    if device == "cpu":
        info["fma peak GFLOP/s"] = fma_peak(info["threads"])
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["tf32"] = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    return info


@functools.cache
def fma_peak(threads):
    """This CPU's peak float32 multiply-add rate in GFLOP/s on `threads` threads (bench/fma_peak.c,
    compiled here for this CPU), the roof any matrix product here stays under; None where it
    cannot be measured (no C compiler with OpenMP, a build or run that fails), so that a benchmark
    then leaves its %peak columns out instead of failing."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    source = Path(__file__).resolve().parent / "fma_peak.c"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            exe = Path(tmp) / "fma_peak"
            subprocess.run([cc, "-O3", "-march=native", "-ffp-contract=fast", "-fopenmp",
                            str(source), "-o", str(exe)], capture_output=True, check=True,
                           timeout=120)
            out = subprocess.run([str(exe)], capture_output=True, text=True, env=env, check=True,
                                 timeout=120)
        return float(out.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


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
