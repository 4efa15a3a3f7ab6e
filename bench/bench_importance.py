"""Hessian-norm importance (MATH.md §2.1): the fused native op vs the same closed form in eager
PyTorch vs torch.compile of it vs the exact per-sample Hessian by torch.func (vmap(hessian)) vs
the layer's plain forward (product + activation); and the tracker's fused activation
(activation_with_hessian_norm) vs the plain activation, alone and after the layer's product.

    python bench/bench_importance.py [--quick] [--activation tanh] [--device cpu|cuda]

Prints a table and writes bench/results/importance_<device>.json. Ratios: x/native > 1 means the
native op is faster; native/forward and tracked/forward are overheads (targets: torch.func/native
>= 100 at the small size, native/forward <= 1.5, tracked/forward <= 1.2).

torch.func builds every sample's full (out, in, in) Hessian: it runs on a subset of the batch (and
at the large dense size of the units) and its time is scaled linearly to the whole layer; the
convolution's (64·32·32)² Hessian per output element is out of reach and left out.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from mapopt_native import reference  # noqa: E402
from mapopt_native.prune import ImportanceTracker  # noqa: E402
from mapopt_native.ops import (activation_with_hessian_norm, hessian_norm_conv2d,  # noqa: E402
                               hessian_norm_linear)

# name: (kind, batch, in, out, spatial), and for torch.func (samples, units) timed of the batch.
SIZES = {
    "linear-256": ("linear", 256, 256, 256, None, (4, 256)),
    "linear-1024": ("linear", 1024, 1024, 1024, None, (1, 64)),
    "conv-64x32x32": ("conv", 32, 64, 64, 32, None),
}


def sigma_of(activation):
    return 1.0 if activation in ("relu", "leaky_relu", "identity") else None


def torch_func_time(x, w, b, activation, samples, units, sigma, min_run_time):
    """Seconds of the exact per-sample Hessian norms of `units` units over `samples` rows, scaled
    to the whole batch and every unit. (Smoothed activations have no exact Hessian to take: time
    the same Hessian of tanh.)"""
    act = activation if sigma is None else "tanh"
    ws, bs = w[:units], b[:units]

    def f(v):
        return reference.activation(act, F.linear(v, ws, bs))

    xs = x[:samples]
    run = lambda: torch.func.vmap(torch.func.hessian(f))(xs).pow(2).sum((-1, -2)).mean(0)  # noqa: E731
    t = harness.compare({"torch.func": run}, min_rounds=2, min_run_time=min_run_time)["torch.func"]
    return t * (x.shape[0] / samples) * (w.shape[0] / units)


def bench_size(name, activation, device, min_run_time, compiled):
    kind, B, I, O, S, func_subset = SIZES[name]
    sigma = sigma_of(activation)
    act = lambda z: reference.activation(activation, z)  # noqa: E731
    if kind == "linear":
        x = torch.randn(B, I, device=device)
        w = torch.randn(O, I, device=device) / I ** 0.5
        b = torch.randn(O, device=device)
        layer = lambda: F.linear(x, w, b)  # noqa: E731
        scores = {
            "native": lambda: hessian_norm_linear(x, w, b, activation, sigma=sigma),
            "eager": lambda: reference.hessian_norm_linear(x, w, b, activation, sigma),
            "compiled": lambda: compiled["linear"](x, w, b, activation, sigma),
        }
        s = (w * w).sum(1)
    else:
        x = torch.randn(B, I, S, S, device=device)
        w = torch.randn(O, I, 3, 3, device=device) / (9 * I) ** 0.5
        b = torch.randn(O, device=device)
        layer = lambda: F.conv2d(x, w, b, padding=1)  # noqa: E731
        scores = {
            "native": lambda: hessian_norm_conv2d(x, w, b, padding=1, activation=activation,
                                                  sigma=sigma),
            "eager": lambda: reference.hessian_norm_conv(x, w, b, padding=1,
                                                         activation=activation, sigma=sigma),
            "compiled": lambda: compiled["conv"](x, w, b, 1, 1, 1, 1, activation, sigma),
        }
        s = F.conv2d(torch.ones_like(x[:1]), w * w, padding=1)[0]
    if compiled is None:
        del scores["compiled"]
    z = layer()
    acc = torch.zeros(z.shape[1:], device=device)
    fns = dict(scores)
    fns.update({
        "forward": lambda: act(layer()),
        "activation": lambda: act(z),
        "tracked activation": lambda: activation_with_hessian_norm(z, s, acc, activation,
                                                                   sigma=sigma),
        "tracked forward": lambda: activation_with_hessian_norm(layer(), s, acc, activation,
                                                                sigma=sigma),
    })
    t = harness.compare(fns, min_run_time=min_run_time)
    row = {"size": name, "activation": activation}
    row.update({f"{k} ms": v * 1e3 for k, v in t.items()})
    if func_subset is not None and device == "cpu":
        samples, units = func_subset
        t_func = torch_func_time(x, w, b, activation, samples, units, sigma, min_run_time)
        row["torch.func ms (scaled)"] = t_func * 1e3
        row["torch.func/native"] = t_func / t["native"]
        row["torch.func subset"] = f"{samples} of {B} rows, {units} of {O} units"
    for k in ("eager", "compiled"):
        if k in t:
            row[f"{k}/native"] = t[k] / t["native"]
    row["native/forward"] = t["native"] / t["forward"]
    row["tracked/activation"] = t["tracked activation"] / t["activation"]
    row["tracked/forward"] = t["tracked forward"] / t["forward"]
    return row


def tracker_models(device):
    """Whole models for ImportanceTracker's overhead on a forward pass (eval mode)."""
    nn = torch.nn
    mlp = nn.Sequential(nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(),
                        nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 10))
    cnn = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.SiLU(),
                        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.SiLU(),
                        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.SiLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return {"mlp 3x1024 tanh, B=256": (mlp.to(device).eval(), torch.randn(256, 1024, device=device)),
            "cnn 3x(64ch 3x3 BN SiLU) 32x32, B=32":
                (cnn.to(device).eval(), torch.randn(32, 64, 32, 32, device=device))}


def bench_tracker(device, min_run_time):
    rows = []
    for name, (model, x) in tracker_models(device).items():
        tracker = ImportanceTracker(model)
        tracked = tracker._gm  # the tracked forward the model runs while the tracker is active
        with torch.no_grad():
            t = harness.compare({"forward": lambda: model(x), "tracked": lambda: tracked(x)},
                                min_run_time=min_run_time)
        rows.append({"model": name, "forward ms": t["forward"] * 1e3,
                     "tracked ms": t["tracked"] * 1e3, "tracked/forward": t["tracked"] / t["forward"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--activation", default="tanh")
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--quick", action="store_true", help="short timing, no torch.compile")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    min_run_time = 0.3 if a.quick else 1.0
    compiled = None if a.quick else {"linear": torch.compile(reference.hessian_norm_linear),
                                     "conv": torch.compile(reference.hessian_norm_conv)}
    rows = []
    for name in a.sizes.split(","):
        rows.append(bench_size(name, a.activation, a.device, min_run_time, compiled))
        print(harness.table(rows[-1:], list(rows[-1])), flush=True)
    columns = ["size", "native ms", "eager ms", "compiled ms", "torch.func ms (scaled)",
               "forward ms", "activation ms", "tracked activation ms", "tracked forward ms",
               "eager/native", "compiled/native", "torch.func/native", "native/forward",
               "tracked/activation", "tracked/forward"]
    print(f"\nHessian-norm importance, activation={a.activation}, {a.device}, "
          f"{torch.get_num_threads()} threads")
    print("torch.func: timed on a subset (rows, units) and scaled linearly to the whole layer:")
    for r in rows:
        if "torch.func subset" in r:
            print(f"  {r['size']}: {r['torch.func subset']}")
    print()
    print(harness.table(rows, columns))
    trackers = bench_tracker(a.device, min_run_time)
    print("\nImportanceTracker on whole models (forward pass, eval mode; target tracked/forward <= 1.2)")
    print(harness.table(trackers, list(trackers[0])))
    path = harness.write(f"importance_{a.device}", {"machine": harness.machine(a.device),
                                                    "quick": a.quick, "rows": rows,
                                                    "tracker": trackers})
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
