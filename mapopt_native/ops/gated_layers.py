"""Whole-sequence gated GRU / LSTM layer ops (one layer, one direction a call; MATH.md §1):
fake kernels, autograd, and the public functions. The C++ side is csrc/gated_layers.h.

input is padded (T, B, I) with batch_sizes None, or packed rows (N, I) with PackedSequence's
batch_sizes (an int64 CPU tensor)."""

import torch
from torch import Tensor

from .gated_cells import (check_gate, check_state, check_weights, fake_grads,
                          run_in_float32_under_autocast)

_ops = torch.ops.mapopt_native


def _layer_shapes(chunks, input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, gate):
    """(rows N, hidden size H) after the fake-kernel checks."""
    check_gate(gate)
    if batch_sizes is None:
        torch._check(input.dim() == 3, lambda: (
            "input must be 3-D (seq_len, batch, input_size) when batch_sizes is not given, got "
            f"shape {list(input.shape)}"))
        rows = input.shape[0] * input.shape[1]
    else:
        torch._check(input.dim() == 2, lambda: (
            f"packed input must be 2-D (rows, input_size), got shape {list(input.shape)}"))
        rows = input.shape[0]
    H = check_weights(chunks, input, w_ih, w_hh, b_ih, b_hh)
    batch = input.shape[1] if batch_sizes is None else hx.shape[0]
    check_state(hx, "hx", batch, H, input)
    return rows, H


def _out_shape(input, H):
    return tuple(input.shape[:-1]) + (H,)


def _needs_workspace(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------- GRU


@torch.library.register_fake("mapopt_native::gated_gru_seq_fwd")
def _(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes, reverse, gate,
      need_workspace):
    rows, H = _layer_shapes(3, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes,
                            gate)
    return (input.new_empty(_out_shape(input, H)), input.new_empty(hx.shape),
            input.new_empty((rows, 4 * H) if need_workspace else (0,)))


@torch.library.register_fake("mapopt_native::gated_gru_seq_bwd")
def _(grad_output, grad_hy, input, hx, weight_ih, weight_hh, output, workspace, batch_sizes,
      reverse, gate, has_bias, output_mask):
    _layer_shapes(3, input, hx, weight_ih, weight_hh, None, None, batch_sizes, gate)
    return fake_grads(3, input, (hx,), weight_ih, weight_hh, has_bias, output_mask)


def _gru_setup_context(ctx, inputs, output):
    input, hx, weight_ih, weight_hh, bias_ih, _, batch_sizes, reverse, gate, _ = inputs
    out, _, workspace = output
    ctx.save_for_backward(input, hx, weight_ih, weight_hh, out, workspace, batch_sizes)
    ctx.reverse, ctx.gate, ctx.has_bias = reverse, gate, bias_ih is not None
    ctx.mark_non_differentiable(workspace)
    ctx.set_materialize_grads(False)  # an unused output (often hy) arrives as None


def _gru_backward(ctx, grad_output, grad_hy, _grad_workspace):
    input, hx, weight_ih, weight_hh, out, workspace, batch_sizes = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], any(need[2:6])]
    grads = _ops.gated_gru_seq_bwd(grad_output, grad_hy, input, hx, weight_ih, weight_hh, out,
                                   workspace, batch_sizes, ctx.reverse, ctx.gate, ctx.has_bias,
                                   mask)
    return tuple(g if n else None for g, n in zip(grads, need[:6])) + (None,) * 4


torch.library.register_autograd("mapopt_native::gated_gru_seq_fwd", _gru_backward,
                                setup_context=_gru_setup_context)


def gated_gru_layer(input: Tensor, hx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                    bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
                    batch_sizes: Tensor | None = None, reverse: bool = False,
                    gate: str = "sigmoid") -> tuple[Tensor, Tensor]:
    """One GRU layer in one direction over a whole sequence: (output, h_n).

    input (T, B, I) with hx (B, H), or packed rows (N, I) with batch_sizes (T,) and hx of the
    first step's batch. Workspace is kept only when a gradient will be needed."""
    need = _needs_workspace(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    out, hy, _ = _ops.gated_gru_seq_fwd(input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                        batch_sizes, reverse, gate, need)
    return out, hy


# ---------------------------------------------------------------- LSTM


@torch.library.register_fake("mapopt_native::gated_lstm_seq_fwd")
def _(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes, reverse, gate,
      need_workspace):
    rows, H = _layer_shapes(4, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes,
                            gate)
    check_state(cx, "cx", hx.shape[0], H, input)
    return (input.new_empty(_out_shape(input, H)), input.new_empty(hx.shape),
            input.new_empty(cx.shape),
            input.new_empty((rows, 4 * H) if need_workspace else (0,)),
            input.new_empty((rows, H) if need_workspace else (0,)))


@torch.library.register_fake("mapopt_native::gated_lstm_seq_bwd")
def _(grad_output, grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, output, workspace,
      cell_states, batch_sizes, reverse, gate, has_bias, output_mask):
    _layer_shapes(4, input, hx, weight_ih, weight_hh, None, None, batch_sizes, gate)
    return fake_grads(4, input, (hx, cx), weight_ih, weight_hh, has_bias, output_mask)


def _lstm_setup_context(ctx, inputs, output):
    input, hx, cx, weight_ih, weight_hh, bias_ih, _, batch_sizes, reverse, gate, _ = inputs
    out, _, _, workspace, cell_states = output
    ctx.save_for_backward(input, hx, cx, weight_ih, weight_hh, out, workspace, cell_states,
                          batch_sizes)
    ctx.reverse, ctx.gate, ctx.has_bias = reverse, gate, bias_ih is not None
    ctx.mark_non_differentiable(workspace, cell_states)
    ctx.set_materialize_grads(False)


def _lstm_backward(ctx, grad_output, grad_hy, grad_cy, _grad_workspace, _grad_cell_states):
    input, hx, cx, weight_ih, weight_hh, out, workspace, cell_states, batch_sizes = \
        ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], any(need[3:7])]
    grads = _ops.gated_lstm_seq_bwd(grad_output, grad_hy, grad_cy, input, hx, cx, weight_ih,
                                    weight_hh, out, workspace, cell_states, batch_sizes,
                                    ctx.reverse, ctx.gate, ctx.has_bias, mask)
    return tuple(g if n else None for g, n in zip(grads, need[:7])) + (None,) * 4


torch.library.register_autograd("mapopt_native::gated_lstm_seq_fwd", _lstm_backward,
                                setup_context=_lstm_setup_context)


def gated_lstm_layer(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor,
                     weight_hh: Tensor, bias_ih: Tensor | None = None,
                     bias_hh: Tensor | None = None, batch_sizes: Tensor | None = None,
                     reverse: bool = False,
                     gate: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction over a whole sequence: (output, h_n, c_n)."""
    need = _needs_workspace(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    out, hy, cy, _, _ = _ops.gated_lstm_seq_fwd(input, hx, cx, weight_ih, weight_hh, bias_ih,
                                                bias_hh, batch_sizes, reverse, gate, need)
    return out, hy, cy


run_in_float32_under_autocast("gated_gru_seq_fwd", "gated_gru_seq_bwd", "gated_lstm_seq_fwd",
                              "gated_lstm_seq_bwd")
