"""Gated GRU / LSTM layers over a whole sequence (T = 100), training step (forward + backward)
and inference: native (each gate) vs torch.nn.GRU / LSTM (sigmoid) vs a Python loop of the
reference cell, eager and with the cell under torch.compile, vs sru.SRU (PyPI, a peer) at the same
sizes, vs the floor: the same matrix products alone. Input size = H.

    python bench/bench_rnn.py [--device cpu|cuda] [--batch 8,64] [--hidden 128,512] [--layers 1,2]
                              [--only native,torch.nn] [--name rnn_cpu_headline]

Prints a table and writes bench/results/<name>.json (default rnn_<device>). Ratios > 1 mean native
is faster. --only times just those candidates (native, torch.nn, loop, compiled, sru, floor), so
that each gets more rounds and none runs beside the others' memory traffic. On the CPU, "%peak"
columns give the rate at which native, the loop and the floor ran the floor's products (GFLOP
column) as a share of this CPU's multiply-add peak, measured by bench/fma_peak.c: no candidate can
pass 100, so x/native can be at most 100 / (x %peak).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import mapopt_native  # noqa: E402
from mapopt_native import reference  # noqa: E402
from mapopt_native.nn import GatedGRU, GatedLSTM  # noqa: E402

T = 100
CANDIDATES = ["native", "torch.nn", "loop", "compiled", "sru", "floor"]
KINDS = {"gru": (GatedGRU, torch.nn.GRU, reference.gru_cell, 3),
         "lstm": (GatedLSTM, torch.nn.LSTM, reference.lstm_cell, 4)}


def timed(forward, params, train):
    """One iteration: forward, and in training the gradient of every parameter."""
    if train:
        def run():
            out = forward()
            torch.autograd.grad(out.sum(), params)
    else:
        def run():
            with torch.no_grad():
                forward()
    return run


def floor(chunks, layers, x, H, train):
    """The products a layer stack cannot avoid, alone, by the backends the native layers use
    (harness.linear / harness.matmul: oneDNN on the CPU, with pre-packed weights for the per-step
    products; cuBLAS on CUDA): the input projection of every step (on the CPU in the native layers'
    blocks of steps; native LSTM inference makes each step's projection in the pass of its
    recurrent product instead, which as a oneDNN call a step would cost more than these blocks)
    and the recurrent product of each step; in training also each step's recurrent gradient, the
    input gradient of every layer but the first (the benchmark's input needs none, and native
    skips it too), and the two weight gradients over all steps. The native
    CPU layers make their forward products with their own kernel (csrc/cpu/layer_products.h) at
    about oneDNN's rate and without its per-call cost, so they can land below this floor (well
    below at small sizes)."""
    T_, B, _ = x.shape
    dev = x.device
    # Rows per projection block: the native layers' block bytes, in whole steps.
    block_bytes = mapopt_native._C.cpu_projection_block_bytes()
    block = T_ * B if dev.type != "cpu" else max(1, block_bytes // (chunks * H * 4 * B)) * B
    ws = []
    for k in range(layers):
        w_ih = torch.randn(chunks * H, x.shape[2] if k == 0 else H, device=dev)
        w_hh = torch.randn(chunks * H, H, device=dev)
        ws.append((w_ih, harness.pack(w_ih, block) if block < T_ * B else w_ih,
                   harness.pack(w_hh, B), harness.pack(w_hh.t().contiguous(), B)))
    rows = x.reshape(T_ * B, -1)
    h = torch.randn(B, H, device=dev)
    d = torch.randn(T_ * B, chunks * H, device=dev)
    hs = torch.randn(T_ * B, H, device=dev)

    def run():
        inp = rows
        for k, (w_ih, w_ih_packed, w_hh, w_hh_t) in enumerate(ws):
            for r in range(0, T_ * B, block):
                harness.linear(inp[r:r + block], w_ih_packed)
            for _ in range(T_):
                harness.linear(h, w_hh)
            if train:
                if k > 0:
                    harness.matmul(d, w_ih)
                for t in range(T_):
                    harness.linear(d[t * B:(t + 1) * B], w_hh_t)
                harness.matmul(d.t(), inp)
                harness.matmul(d.t(), hs)
            inp = hs
    return run


def floor_gflop(chunks, layers, B, H, train):
    """The floor's multiply-adds, in GFLOP (2 flops each): per layer the input projection and the
    recurrent product over all steps, each T*B x H x chunks*H; in training also the recurrent
    gradient and the two weight gradients, and every layer's input gradient but the first's."""
    product = 2 * T * B * H * chunks * H / 1e9
    return layers * product * (5 if train else 2) + (product * (layers - 1) if train else 0)


def bench_config(kind, layers, B, H, gates, device, rounds, min_run_time, compiled_cells, peers,
                 only):
    ours_cls, torch_cls, ref_cell, chunks = KINDS[kind]
    x = torch.randn(T, B, H, device=device)
    rows = []
    for train in (True, False):
        fns = {}
        for gate in gates:
            m = ours_cls(H, H, layers, gate=gate, device=device)
            params = list(m.parameters())
            weights = [m._weights(k, 0) for k in range(layers)]
            states = tuple(torch.zeros(layers, B, H, device=device)
                           for _ in range(1 if kind == "gru" else 2))
            fns[f"native {gate}"] = timed(lambda m=m: m(x)[0], params, train)
            fns[f"loop {gate}"] = timed(
                lambda w=weights, g=gate: reference.rnn(kind, x, states, w, g)[0], params, train)
            fns[f"compiled {gate}"] = timed(
                lambda w=weights, g=gate: reference.rnn(kind, x, states, w, g,
                                                        cell=compiled_cells[kind])[0],
                params, train)
        theirs = torch_cls(H, H, layers, device=device)
        fns["torch.nn"] = timed(lambda: theirs(x)[0], list(theirs.parameters()), train)
        if "sru" in peers:
            s = peers["sru"].SRU(H, H, num_layers=layers).to(device)
            fns["sru"] = timed(lambda: s(x)[0], list(s.parameters()), train)
        fns["floor"] = floor(chunks, layers, x, H, train)
        fns = {name: fn for name, fn in fns.items() if name.split()[0] in only}
        times = harness.compare(fns, min_rounds=rounds, min_run_time=min_run_time)
        for gate in gates:
            row = {"rnn": kind, "mode": "train" if train else "infer", "layers": layers, "B": B,
                   "H": H, "gate": gate, "native ms": times[f"native {gate}"] * 1e3,
                   "GFLOP": floor_gflop(chunks, layers, B, H, train)}
            for k, name in (("loop", f"loop {gate}"), ("compiled", f"compiled {gate}"),
                            ("floor", "floor")):
                if name in times:
                    row[f"{k} ms"] = times[name] * 1e3
            if gate == "sigmoid":
                for k in ("torch.nn", "sru"):
                    if k in times:
                        row[f"{k} ms"] = times[k] * 1e3
            native = times[f"native {gate}"]
            for k, name in (("loop", f"loop {gate}"), ("compiled", f"compiled {gate}"),
                            ("torch.nn", "torch.nn"), ("sru", "sru")):
                if f"{k} ms" in row:
                    row[f"{k}/native"] = times[name] / native
            if "floor" in times:
                row["native/floor"] = native / times["floor"]
            rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", default="8,64")
    p.add_argument("--hidden", default="128,512")
    p.add_argument("--layers", default="1,2")
    p.add_argument("--kinds", default="gru,lstm")
    p.add_argument("--gates", default=",".join(mapopt_native.GATES))
    p.add_argument("--rounds", type=int, default=3, help="at least this many timed rounds")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of rounds, at least")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-sru", action="store_true", help="skip the sru peer (its CUDA kernels "
                   "compile at first use)")
    p.add_argument("--only", default=",".join(CANDIDATES),
                   help="time only these candidates (native is always timed)")
    p.add_argument("--name", default=None, help="results file name (default rnn_<device>)")
    a = p.parse_args(argv)
    only = set(a.only.split(",")) | {"native"}
    unknown = only - set(CANDIDATES)
    if unknown:
        p.error(f"--only: unknown candidates {sorted(unknown)}; choose from {CANDIDATES}")
    name = a.name or f"rnn_{a.device}"
    if a.threads:
        torch.set_num_threads(a.threads)
    torch._dynamo.config.recompile_limit = 64
    compiled = {k: torch.compile(v[2], dynamic=True) for k, v in KINDS.items()}
    peers = {}
    try:
        if not a.no_sru and "sru" in only:
            import sru
            peers["sru"] = sru
    except ImportError:
        print("sru not installed (pip install sru): its column stays empty")
    rows = []
    for kind in a.kinds.split(","):
        for layers in map(int, a.layers.split(",")):
            for B in map(int, a.batch.split(",")):
                for H in map(int, a.hidden.split(",")):
                    new = bench_config(kind, layers, B, H, a.gates.split(","), a.device,
                                       a.rounds, a.min_run_time, compiled, peers, only)
                    print(harness.table(new, list(new[0])), flush=True)
                    rows += new
                    harness.write(name, {"machine": harness.machine(a.device), "T": T,
                                         "rows": rows})
    columns = ["rnn", "mode", "layers", "B", "H", "gate", "native ms", "torch.nn ms", "loop ms",
               "compiled ms", "sru ms", "floor ms", "torch.nn/native", "loop/native",
               "compiled/native", "sru/native", "native/floor"]
    peak = harness.machine(a.device).get("fma peak GFLOP/s")
    if peak:
        # What share of the CPU's multiply-add peak each candidate's products ran at.
        for row in rows:
            for k in ("native", "loop", "floor"):
                if f"{k} ms" in row:
                    row[f"{k} %peak"] = 100 * row["GFLOP"] / (row[f"{k} ms"] / 1e3) / peak
        columns += ["native %peak", "loop %peak", "floor %peak"]
    print(f"\nT={T}, input size = H, {a.device}; train = forward + backward"
          + (f"; multiply-add peak {peak} GFLOP/s (bench/fma_peak.c)" if peak else "") + "\n")
    print(harness.table(rows, columns))
    path = harness.write(name, {"machine": harness.machine(a.device), "T": T, "rows": rows})
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
