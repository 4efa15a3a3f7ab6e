"""Smoke test of a CPU-only build (MAPOPT_CUDA=0), run by `make cpu-only-test` against the
package folder given as argv[1]: it imports, reports no CUDA, registers no CUDA kernel, and its
cells match the reference for every gate."""

import sys
from pathlib import Path

import torch

import mapopt_native
from mapopt_native import reference

pkg = Path(sys.argv[1]).resolve()
failures = []


def check(name, ok):
    print(f"{name:48s} {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(name)


check("imported from the CPU-only build", Path(mapopt_native.__file__).resolve().is_relative_to(pkg))
info = mapopt_native.build_info()
check("build_info reports no CUDA kernels", info["cuda"] is False and info["cuda_arch"] == [])
for op in ("gated_gru_cell_fwd", "gated_lstm_cell_bwd"):
    check(f"{op}: CPU kernel yes, CUDA kernel no",
          torch._C._dispatch_has_kernel_for_dispatch_key(f"mapopt_native::{op}", "CPU")
          and not torch._C._dispatch_has_kernel_for_dispatch_key(f"mapopt_native::{op}", "CUDA"))
torch.manual_seed(0)
for gate in mapopt_native.GATES:
    cell = mapopt_native.nn.GatedGRUCell(6, 10, gate=gate, dtype=torch.float64)
    x, h = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    ref = reference.gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, gate)
    check(f"GatedGRUCell({gate!r}) matches the reference", torch.allclose(cell(x, h), ref, atol=1e-12))
    cell = mapopt_native.nn.GatedLSTMCell(6, 10, gate=gate, dtype=torch.float64)
    ref = reference.lstm_cell(x, h, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, gate)
    check(f"GatedLSTMCell({gate!r}) matches the reference",
          all(torch.allclose(a, b, atol=1e-12) for a, b in zip(cell(x, (h, h)), ref)))
print(f"cpu-only smoke: {len(failures)} failed")
sys.exit(1 if failures else 0)
