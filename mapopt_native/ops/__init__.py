"""Thin wrappers over torch.ops.mapopt_native.*, with the ops' fake kernels (shapes, for
torch.compile) and autograd formulas. One module per capability."""

from .gated_cells import gated_gru_cell, gated_lstm_cell
from .gated_layers import gated_gru_layer, gated_lstm_layer

__all__ = ["gated_gru_cell", "gated_lstm_cell", "gated_gru_layer", "gated_lstm_layer"]
