"""GatedGRU / GatedLSTM: drop-in replacements for torch.nn.GRU / LSTM with a selectable gate.

Parameters are named, shaped and initialised as torch's (weight_ih_l{k}, weight_hh_l{k},
bias_ih_l{k}, bias_hh_l{k}, with the _reverse suffix for the backward direction), so state_dicts
move both ways. forward(input, hx=None) follows torch: batched (T, B, I) or batch_first, unbatched
(T, I), PackedSequence in -> PackedSequence out, multi-layer, bidirectional, dropout between
layers in training mode. Each layer and direction is one native op over the whole sequence."""

import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..ops import gated_cells, gated_layers
from .cells import reset_like_torch_rnn


class _GatedRNNBase(nn.Module):
    chunks: int  # gate blocks stacked in the weights: 3 (GRU) or 4 (LSTM)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 gate: str = "sigmoid", device=None, dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        if input_size <= 0 or hidden_size <= 0 or num_layers <= 0:
            raise ValueError(f"{name}: input_size, hidden_size and num_layers must be positive, "
                             f"got {input_size}, {hidden_size}, {num_layers}")
        if not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{name}: dropout={dropout} acts between layers only, and num_layers=1",
                          stacklevel=2)
        gated_cells.check_gate(gate)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.gate = bidirectional, gate
        self.num_directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        rows = self.chunks * hidden_size
        self._weight_names = []  # per (layer, direction): the four parameter names
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                names = [f"weight_ih{suffix}", f"weight_hh{suffix}"]
                self.register_parameter(names[0], nn.Parameter(torch.empty(rows, layer_input, **factory)))
                self.register_parameter(names[1], nn.Parameter(torch.empty(rows, hidden_size, **factory)))
                if bias:
                    names += [f"bias_ih{suffix}", f"bias_hh{suffix}"]
                    for n in names[2:]:
                        self.register_parameter(n, nn.Parameter(torch.empty(rows, **factory)))
                self._weight_names.append(names)
        self.reset_parameters()

    # nn.LSTM's output projection; these layers have none (code written for nn.RNNBase reads it).
    proj_size = 0

    def reset_parameters(self) -> None:
        reset_like_torch_rnn(self)

    def flatten_parameters(self) -> None:
        """Nothing to do: the layer ops pack the weights they need on every call. Present so code
        written for nn.GRU / nn.LSTM (which calls it after moving or wrapping the module) runs."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """The parameters of each (layer, direction), in nn.RNNBase's order and grouping."""
        return [[getattr(self, n) for n in names] for names in self._weight_names]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, gate={self.gate!r}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for flag, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False)):
            if getattr(self, flag) != default:
                s += f", {flag}={getattr(self, flag)}"
        return s

    def _weights(self, layer: int, direction: int) -> tuple:
        names = self._weight_names[layer * self.num_directions + direction]
        ws = tuple(getattr(self, n) for n in names)
        return ws if self.bias else ws + (None, None)

    def _initial_state(self, hx, batch: int, x: Tensor, unbatched: bool, sorted_indices,
                       what: str) -> Tensor:
        """hx as (layers*directions, batch, H) in the op's (sorted) batch order."""
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if hx is None:
            return torch.zeros(shape, dtype=x.dtype, device=x.device)
        expected = (shape[0], shape[2]) if unbatched else shape
        if tuple(hx.shape) != expected:
            raise ValueError(f"{type(self).__name__}: {what} must have shape {list(expected)} "
                             f"(num_layers*num_directions, {'' if unbatched else 'batch, '}"
                             f"hidden_size), got {list(hx.shape)}")
        if unbatched:
            hx = hx.unsqueeze(1)
        return hx if sorted_indices is None else hx.index_select(1, sorted_indices)

    def forward(self, input, hx=None):
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            if int(batch_sizes.sum()) != x.shape[0]:
                # pack_padded_sequence accepts lengths beyond the padded length and packs wrongly.
                raise ValueError(
                    f"{name}: the PackedSequence's batch_sizes sum to {int(batch_sizes.sum())} "
                    f"rows but its data has {x.shape[0]}: were lengths longer than the padded "
                    "sequence?")
            batch = int(batch_sizes[0])
            unbatched = False
        else:
            if not torch.is_tensor(input) or input.dim() not in (2, 3):
                raise ValueError(f"{name}: input must be 3-D (seq_len, batch, input_size), 2-D "
                                 "(seq_len, input_size) or a PackedSequence, got "
                                 f"{list(input.shape) if torch.is_tensor(input) else type(input)}")
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (
                input.transpose(0, 1) if self.batch_first else input)
            batch_sizes = sorted_indices = unsorted_indices = None
            batch = x.shape[1]
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input has {x.shape[-1]} features, expected input_size="
                             f"{self.input_size} (input shape {list(x.shape)})")
        states = self._initial_states(hx, batch, x, unbatched, sorted_indices)
        out, finals = self._run_layers(x, states, batch_sizes)
        finals = tuple(f if unsorted_indices is None else f.index_select(1, unsorted_indices)
                       for f in finals)
        if packed:
            out = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
        elif unbatched:
            out, finals = out.squeeze(1), tuple(f.squeeze(1) for f in finals)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, self._pack_finals(finals)

    def _run_layers(self, x: Tensor, states: tuple, batch_sizes):
        """Every layer and direction; returns (last layer's output, final states stacked)."""
        finals = [[] for _ in states]
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                out, *last = self._layer(x, tuple(s[k] for s in states),
                                         self._weights(layer, direction), batch_sizes,
                                         reverse=direction == 1)
                outs.append(out)
                for f, s in zip(finals, last):
                    f.append(s)
            x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        return x, tuple(torch.stack(f) for f in finals)


class GatedGRU(_GatedRNNBase):
    """torch.nn.GRU with the gate family chosen by `gate` (MATH.md §1).

    forward(input, hx=None) -> (output, h_n), as torch.nn.GRU."""

    chunks = 3

    def _initial_states(self, hx, batch, x, unbatched, sorted_indices):
        return (self._initial_state(hx, batch, x, unbatched, sorted_indices, "hx"),)

    def _layer(self, x, states, weights, batch_sizes, reverse):
        return gated_layers.gated_gru_layer(x, states[0], *weights, batch_sizes=batch_sizes,
                                            reverse=reverse, gate=self.gate)

    def _pack_finals(self, finals):
        return finals[0]


class GatedLSTM(_GatedRNNBase):
    """torch.nn.LSTM with the gate family chosen by `gate` (MATH.md §1); no proj_size.

    forward(input, hx=None) -> (output, (h_n, c_n)), as torch.nn.LSTM."""

    chunks = 4

    def _initial_states(self, hx, batch, x, unbatched, sorted_indices):
        if hx is None:
            hx = (None, None)
        elif not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("GatedLSTM: hx must be a pair (h_0, c_0) of tensors")
        return tuple(self._initial_state(h, batch, x, unbatched, sorted_indices, what)
                     for h, what in zip(hx, ("h_0", "c_0")))

    def _layer(self, x, states, weights, batch_sizes, reverse):
        return gated_layers.gated_lstm_layer(x, states[0], states[1], *weights,
                                             batch_sizes=batch_sizes, reverse=reverse,
                                             gate=self.gate)

    def _pack_finals(self, finals):
        return finals
