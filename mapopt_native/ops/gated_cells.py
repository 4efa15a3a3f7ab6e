"""Gated GRU / LSTM cell ops (MATH.md §1): fake kernels and the public functions (their autograd
kernels are C++, csrc/autograd/gated_cells.cpp).

The kernels validate their inputs in C++ (csrc/common/checks.h); the fake kernels repeat those
checks with torch._check so a compiled model fails with the same message at trace time."""

import torch
from torch import Tensor

from .. import _C
from .checks import check_floating, check_like, check_shape

_ops = torch.ops.mapopt_native
_GATES = tuple(_C.gate_names())


def check_gate(gate: str) -> None:
    if gate not in _GATES:
        raise ValueError(
            f"gate must be one of {', '.join(repr(g) for g in _GATES)}, got {gate!r}")


def check_weights(chunks, input, w_ih, w_hh, b_ih, b_hh):
    """The fake-kernel mirror of check_weights in csrc/common/checks.h (input: its last dim is
    the features); returns H."""
    check_cell_dtype(input)
    torch._check(w_ih.dim() == 2 and w_ih.shape[0] % chunks == 0 and w_ih.shape[0] > 0, lambda: (
        f"weight_ih must have shape ({chunks}*hidden_size, input_size), got {list(w_ih.shape)}"))
    H = w_ih.shape[0] // chunks
    torch._check(input.shape[-1] == w_ih.shape[1], lambda: (
        f"input has {input.shape[-1]} features but weight_ih {list(w_ih.shape)} expects "
        f"input_size={w_ih.shape[1]}"))
    check_shape(w_hh, "weight_hh", (chunks * H, H), "(chunks*hidden_size, hidden_size)")
    check_like(w_ih, "weight_ih", input, "input")
    check_like(w_hh, "weight_hh", input, "input")
    torch._check((b_ih is None) == (b_hh is None),
                 lambda: "bias_ih and bias_hh must be given together or both omitted")
    if b_ih is not None:
        for t, name in ((b_ih, "bias_ih"), (b_hh, "bias_hh")):
            check_shape(t, name, (chunks * H,), "(chunks*hidden_size,)")
            check_like(t, name, input, "input")
    return H


def check_cell_dtype(input):
    """The fake-kernel mirror of check_cell_dtype in csrc/common/checks.h."""
    if input.device.type == "cpu":
        torch._check(input.dtype in (torch.float32, torch.float64), lambda: (
            f"input must be float32 or float64 on the CPU, got {input.dtype} (the Python "
            "package's ops run them in float32 under torch.autocast)"))
    else:
        check_floating(input, "input")


def run_in_float32_under_autocast(*ops: str) -> None:
    """Autocast rules for the gated ops: in an autocast region their floating inputs (float64
    aside) are cast to float32 and they run with autocast off, so a model under torch.autocast runs
    them as a float32 model would, and gradients flow back through the casts. Backward ops get the
    rule too: a backward run inside the region would otherwise autocast the products the op makes
    itself. Why not autocast's lower precision: the CPU kernels are float32 / float64 only, and one
    rule on both devices keeps a model's results alike on each (on CUDA a float16 / bfloat16 module
    called outside autocast runs in its own dtype)."""
    for op in ops:
        for device in ("cpu", "cuda"):
            if torch.amp.is_autocast_available(device):
                torch.library.register_autocast(f"mapopt_native::{op}", device, torch.float32)


def check_state(state, name, batch, H, input):
    check_shape(state, name, (batch, H), "(batch, hidden_size)")
    check_like(state, name, input, "input")


def _check_cell(chunks, input, hx, cx, w_ih, w_hh, b_ih, b_hh, gate):
    """The fake-kernel mirror of check_cell_inputs in csrc/common/checks.h; returns H."""
    check_gate(gate)
    torch._check(input.dim() == 2,
                 lambda: f"input must be 2-D (batch, input_size), got shape {list(input.shape)}")
    H = check_weights(chunks, input, w_ih, w_hh, b_ih, b_hh)
    check_state(hx, "hx", input.shape[0], H, input)
    if cx is not None:
        check_state(cx, "cx", input.shape[0], H, input)
    return H


def fake_grads(chunks, input, states, weight_ih, weight_hh, has_bias, output_mask):
    """Shapes of a backward op's gradients: (input, *states, weight_ih, weight_hh, bias_ih,
    bias_hh); output_mask covers (input, *states, parameters), and what it leaves out is (0,)."""
    *inputs_wanted, params = output_mask
    like = [t.new_empty(t.shape) if w else t.new_empty((0,))
            for t, w in zip((input, *states), inputs_wanted)]
    like += [w.new_empty(w.shape) if params else w.new_empty((0,)) for w in (weight_ih, weight_hh)]
    bias = (chunks * weight_hh.shape[1],) if params and has_bias else (0,)
    return tuple(like) + (input.new_empty(bias), input.new_empty(bias))


# ---------------------------------------------------------------- GRU


@torch.library.register_fake("mapopt_native::gated_gru_cell_fwd")
def _(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, gate):
    H = _check_cell(3, input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh, gate)
    B = input.shape[0]
    return input.new_empty((B, H)), input.new_empty((B, 4 * H))


@torch.library.register_fake("mapopt_native::gated_gru_cell_bwd")
def _(grad_hy, input, hx, weight_ih, weight_hh, workspace, gate, has_bias, output_mask):
    _check_cell(3, input, hx, None, weight_ih, weight_hh, None, None, gate)
    return fake_grads(3, input, (hx,), weight_ih, weight_hh, has_bias, output_mask)


# The cells' autograd kernels are in C++ (csrc/autograd/gated_cells.cpp): a cell runs once per
# step of a Python loop, where a Python autograd formula cost more than the step's kernels.


def gated_gru_cell(input: Tensor, hx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                   bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
                   gate: str = "sigmoid") -> Tensor:
    """One GRU step h' = cell(x, h) with the given gate family; input (B, I), hx (B, H)."""
    return _ops.gated_gru_cell_fwd(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, gate)[0]


# ---------------------------------------------------------------- LSTM


@torch.library.register_fake("mapopt_native::gated_lstm_cell_fwd")
def _(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, gate):
    H = _check_cell(4, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, gate)
    B = input.shape[0]
    return input.new_empty((B, H)), input.new_empty((B, H)), input.new_empty((B, 4 * H))


@torch.library.register_fake("mapopt_native::gated_lstm_cell_bwd")
def _(grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, cy, workspace, gate, has_bias,
      output_mask):
    _check_cell(4, input, hx, cx, weight_ih, weight_hh, None, None, gate)
    return fake_grads(4, input, (hx, cx), weight_ih, weight_hh, has_bias, output_mask)


def gated_lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                    bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
                    gate: str = "sigmoid") -> tuple[Tensor, Tensor]:
    """One LSTM step (h', c') = cell(x, (h, c)) with the given gate family."""
    hy, cy, _ = _ops.gated_lstm_cell_fwd(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                                         gate)
    return hy, cy


run_in_float32_under_autocast("gated_gru_cell_fwd", "gated_gru_cell_bwd", "gated_lstm_cell_fwd",
                              "gated_lstm_cell_bwd")
