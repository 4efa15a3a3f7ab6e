"""GatedGRUCell / GatedLSTMCell: drop-in replacements for torch.nn.GRUCell / LSTMCell.

Parameters are named, shaped and initialised as torch's (weight_ih (chunks*H, I), weight_hh
(chunks*H, H), bias_ih, bias_hh; gate order r,z,n and i,f,g,o), so state_dicts move both ways.
Each step is one native op: the matrix products plus one fused pointwise kernel, forward and
backward."""

import math

import torch
from torch import Tensor, nn

from ..ops import gated_cells


def reset_like_torch_rnn(module: nn.Module) -> None:
    """torch.nn's RNN initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every parameter."""
    bound = 1.0 / math.sqrt(module.hidden_size)
    for p in module.parameters():
        nn.init.uniform_(p, -bound, bound)


class _GatedCellBase(nn.Module):
    chunks: int  # gate blocks stacked in the weights: 3 (GRU) or 4 (LSTM)

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 gate: str = "sigmoid", device=None, dtype=None) -> None:
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"input_size and hidden_size must be positive, got input_size="
                             f"{input_size}, hidden_size={hidden_size}")
        gated_cells.check_gate(gate)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.gate = gate
        factory = {"device": device, "dtype": dtype}
        rows = self.chunks * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(rows, **factory))
            self.bias_hh = nn.Parameter(torch.empty(rows, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_like_torch_rnn(self)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, gate={self.gate!r}"
        return s if self.bias else s + ", bias=False"

    def _batched(self, input: Tensor, states: tuple[Tensor | None, ...]):
        """(2-D input, states as (B, H) tensors, whether the input was unbatched)."""
        name = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: input must be 1-D (input_size,) or 2-D (batch, input_size),"
                             f" got shape {list(input.shape)}")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        out = []
        for s in states:
            if s is None:
                s = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype, device=x.device)
            elif s.dim() != input.dim():
                raise ValueError(
                    f"{name}: for {input.dim()}-D input the hidden state must be {input.dim()}-D, "
                    f"got shape {list(s.shape)}")
            elif unbatched:
                s = s.unsqueeze(0)
            out.append(s)
        return x, out, unbatched


class GatedGRUCell(_GatedCellBase):
    """torch.nn.GRUCell with the gate family chosen by `gate` (MATH.md §1).

    forward(input, hx=None) -> h': input (B, I) or (I,), hx (B, H) or (H,), zeros by default."""

    chunks = 3

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, (h,), unbatched = self._batched(input, (hx,))
        hy = gated_cells.gated_gru_cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih,
                                        self.bias_hh, self.gate)
        return hy.squeeze(0) if unbatched else hy


class GatedLSTMCell(_GatedCellBase):
    """torch.nn.LSTMCell with the gate family chosen by `gate` (MATH.md §1).

    forward(input, hx=None) -> (h', c'): hx is a pair (h, c), zeros by default."""

    chunks = 4

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError("GatedLSTMCell: hx must be a pair (h, c) of tensors")
        x, (h, c), unbatched = self._batched(input, (None, None) if hx is None else tuple(hx))
        hy, cy = gated_cells.gated_lstm_cell(x, h, c, self.weight_ih, self.weight_hh,
                                             self.bias_ih, self.bias_hh, self.gate)
        return (hy.squeeze(0), cy.squeeze(0)) if unbatched else (hy, cy)
