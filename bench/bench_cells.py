"""Gated cells, a 100-step loop forward + backward: native vs the eager reference vs
torch.compile(reference) vs torch.nn.GRUCell / LSTMCell (sigmoid only), input size = H.

    python bench/bench_cells.py [--device cpu|cuda] [--batch 1,32,256] [--hidden 64,256,1024]

Prints a table and writes bench/results/cells_<device>.json. Ratios > 1 mean native is faster.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import mapopt_native  # noqa: E402
from mapopt_native import reference  # noqa: E402
from mapopt_native.nn import GatedGRUCell, GatedLSTMCell  # noqa: E402

STEPS = 100
KINDS = {
    "gru": (GatedGRUCell, torch.nn.GRUCell, reference.gru_cell),
    "lstm": (GatedLSTMCell, torch.nn.LSTMCell, reference.lstm_cell),
}


def loop(step, xs, state0, params):
    """One timed iteration: STEPS forward steps, then the gradient of every parameter."""
    def run():
        state = state0
        for x in xs:
            state = step(x, state)
        h = state[0] if isinstance(state, tuple) else state
        torch.autograd.grad(h.sum(), params)
    return run


def floor_loop(kind, cell, xs, h0):
    """The same matrix products alone, by the backends the native cell uses: per step the two
    forward projections (harness.linear) and the three of the backward (ATen's mm: dh, dW_ih,
    dW_hh; the inputs need no gradient)."""
    w_ih, w_hh = cell.weight_ih.detach(), cell.weight_hh.detach()
    d = torch.randn(h0.shape[0], w_ih.shape[0], device=h0.device)

    def run():
        for x in xs:
            harness.linear(x, w_ih)
            harness.linear(h0, w_hh)
            torch.mm(d, w_hh)
            torch.mm(d.t(), x)
            torch.mm(d.t(), h0)
    return run


def reference_step(kind, cell, fn):
    w = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    if kind == "gru":
        return lambda x, h: fn(x, h, *w, cell.gate)
    return lambda x, s: fn(x, s[0], s[1], *w, cell.gate)


def bench_one(kind, gate, B, H, device, min_rounds, min_run_time, compiled_fns):
    ours_cls, torch_cls, ref_fn = KINDS[kind]
    cell = ours_cls(H, H, gate=gate, device=device)
    xs = torch.randn(STEPS, B, H, device=device)
    h0 = torch.randn(B, H, device=device)
    state0 = h0 if kind == "gru" else (h0, torch.randn(B, H, device=device))
    params = list(cell.parameters())
    fns = {
        "native": loop(cell, xs, state0, params),
        "eager": loop(reference_step(kind, cell, ref_fn), xs, state0, params),
        "compiled": loop(reference_step(kind, cell, compiled_fns[kind]), xs, state0, params),
        "floor": floor_loop(kind, cell, xs, h0),
    }
    if gate == "sigmoid":
        theirs = torch_cls(H, H, device=device)
        theirs.load_state_dict(cell.state_dict())
        fns["torch.nn"] = loop(theirs, xs, state0, list(theirs.parameters()))
    times = harness.compare(fns, min_rounds=min_rounds, min_run_time=min_run_time)
    row = {"cell": kind, "gate": gate, "B": B, "H": H}
    row.update({f"{k} ms": v * 1e3 for k, v in times.items()})
    for k in ("eager", "compiled", "torch.nn", "floor"):
        if k in times:
            row[f"{k}/native"] = times[k] / times["native"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", default="1,32,256")
    p.add_argument("--hidden", default="64,256,1024")
    p.add_argument("--kinds", default="gru,lstm")
    p.add_argument("--gates", default=",".join(mapopt_native.GATES))
    p.add_argument("--rounds", type=int, default=5, help="at least this many timed rounds")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of rounds, at least")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    # One compiled graph per (cell, gate, batch 1 or not); dynamic shapes cover the sizes.
    torch._dynamo.config.recompile_limit = 64
    compiled = {k: torch.compile(v[2], dynamic=True) for k, v in KINDS.items()}
    rows = []
    for kind in a.kinds.split(","):
        for B in map(int, a.batch.split(",")):
            for H in map(int, a.hidden.split(",")):
                for gate in a.gates.split(","):
                    rows.append(bench_one(kind, gate, B, H, a.device, a.rounds, a.min_run_time,
                                          compiled))
                    print(harness.table(rows[-1:], list(rows[-1])), flush=True)
                    harness.write(f"cells_{a.device}", {"machine": harness.machine(a.device),
                                                        "steps": STEPS, "rows": rows})
    columns = ["cell", "gate", "B", "H", "native ms", "eager ms", "compiled ms", "torch.nn ms",
               "floor ms", "eager/native", "compiled/native", "torch.nn/native", "floor/native"]
    print(f"\n{STEPS}-step loop, forward + backward, input size = H, {a.device}\n")
    print(harness.table(rows, columns))
    path = harness.write(f"cells_{a.device}", {"machine": harness.machine(a.device),
                                               "steps": STEPS, "rows": rows})
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
