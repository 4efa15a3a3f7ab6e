"""Distillation losses, forward + backward: native kd_loss vs the eager composite
(reference.kd_loss: F.cross_entropy + the explicit distance) vs torch.compile of that composite;
native mapping_distance over 8 pairs of mixed shapes vs a Python loop (reference.mapping_distance)
and its compiled version. fp32.

    python bench/bench_distill.py [--device cpu|cuda] [--quick]

Peak memory: the most bytes allocated at once during one forward + backward beyond what was
allocated before it, in units of one logits-size buffer (N·C·4 bytes); the gradient itself, which
every candidate must produce, counts as 1. On CUDA torch.cuda.max_memory_allocated; on the CPU the
allocations and frees recorded by torch.profiler (profile_memory=True), per op (self, without its
children) and between ops, summed in the order the ops started (a temporary an op frees before
returning is missed).

Prints a table and writes bench/results/distill_<device>.json. Ratios > 1 mean native is faster.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from mapopt_native import reference  # noqa: E402
from mapopt_native.distill import kd_loss, mapping_distance  # noqa: E402

KD_SIZES = [(4096, 1000), (512, 32000)]
ALPHA, TEMPERATURE = 0.5, 2.0


def kd_step(fn, s, t, y, distance):
    def run():
        fn(s, t, y, ALPHA, distance=distance, temperature=TEMPERATURE).backward()
        s.grad = None
    return run


def pairs_step(fn, students, teachers):
    def run():
        fn(students, teachers).backward()
        for s in students:
            s.grad = None
    return run


def peak_bytes(run, device):
    """Peak bytes allocated during run() beyond those allocated before it."""
    run()  # warm-up: compilation, lazy init
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        run()
    # Each op's own allocations minus frees (children excluded), and the frees between ops, in
    # the order they started: an op's internal temporaries freed before it returns are missed.
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def bench_kd(device, sizes, min_run_time):
    rows = []
    for N, C in sizes:
        for distance in ("l2", "kl"):
            s = torch.randn(N, C, device=device, requires_grad=True)
            t = torch.randn(N, C, device=device)
            y = torch.randint(0, C, (N,), device=device)
            compiled = torch.compile(reference.kd_loss)
            fns = {
                "native": kd_step(kd_loss, s, t, y, distance),
                "eager": kd_step(reference.kd_loss, s, t, y, distance),
                "compiled": kd_step(compiled, s, t, y, distance),
            }
            times = harness.compare(fns, min_run_time=min_run_time)
            logits_bytes = N * C * s.element_size()
            peaks = {k: peak_bytes(f, device) / logits_bytes for k, f in fns.items()}
            rows.append({
                "op": "kd_loss", "size": f"N={N} C={C}", "distance": distance,
                "native_ms": 1e3 * times["native"], "eager_ms": 1e3 * times["eager"],
                "compiled_ms": 1e3 * times["compiled"],
                "vs_eager": times["eager"] / times["native"],
                "vs_compiled": times["compiled"] / times["native"],
                "peak_native": peaks["native"], "peak_eager": peaks["eager"],
                "peak_compiled": peaks["compiled"],
            })
            print(harness.table(rows[-1:], list(rows[-1])), flush=True)
    return rows


# 8 feature pairs of a small CNN / MLP student: full feature maps at batch 64 (bandwidth-bound),
# and pooled features at batch 8 (where the per-op overhead of a loop shows).
PAIR_SHAPES = {
    "maps": [(64, 32, 32, 32), (64, 64, 16, 16), (64, 128, 8, 8), (64, 256, 4, 4), (64, 512),
             (64, 256), (64, 100), (64, 10, 7)],
    "pooled": [(8, 32), (8, 64), (8, 128), (8, 256), (8, 512), (8, 256), (8, 100), (8, 10, 7)],
}


def mixed_pairs(device, shapes):
    students = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    teachers = [torch.randn(s, device=device) for s in shapes]
    return students, teachers


def bench_pairs(device, kind, scale, min_run_time):
    shapes = [(max(1, s[0] // scale),) + s[1:] for s in PAIR_SHAPES[kind]]
    students, teachers = mixed_pairs(device, shapes)
    fns = {
        "native": pairs_step(mapping_distance, students, teachers),
        "loop": pairs_step(reference.mapping_distance, students, teachers),
        "compiled": pairs_step(torch.compile(reference.mapping_distance), students, teachers),
    }
    times = harness.compare(fns, min_run_time=min_run_time)
    elements = sum(s.numel() for s in students)
    row = {"op": "mapping_distance", "size": f"8 pairs {kind}, {elements} el",
           "native_ms": 1e3 * times["native"], "loop_ms": 1e3 * times["loop"],
           "compiled_ms": 1e3 * times["compiled"], "vs_loop": times["loop"] / times["native"],
           "vs_compiled": times["compiled"] / times["native"], "shapes": [list(s) for s in shapes]}
    print(harness.table([row], [c for c in row if c != "shapes"]), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of the batch sizes, shorter timing")
    args = parser.parse_args()
    scale = 4 if args.quick else 1
    min_run_time = 0.3 if args.quick else 1.0
    sizes = [(N // scale, C) for N, C in KD_SIZES]
    kd_rows = bench_kd(args.device, sizes, min_run_time)
    pair_rows = [bench_pairs(args.device, kind, scale, min_run_time) for kind in PAIR_SHAPES]
    print()
    print(harness.table(kd_rows, list(kd_rows[0])))
    print(harness.table(pair_rows, [c for c in pair_rows[0] if c != "shapes"]))
    path = harness.write(f"distill_{args.device}", {
        "machine": harness.machine(args.device),
        "quick": args.quick,
        "alpha": ALPHA, "temperature": TEMPERATURE, "dtype": "float32",
        "peak_memory_unit": "bytes of one (N, C) logits buffer; the gradient itself counts 1",
        "kd_loss": kd_rows,
        "mapping_distance": pair_rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
