"""Thin wrappers over torch.ops.mapopt_native.*, with the ops' fake kernels (shapes, for
torch.compile) and autograd formulas. One module per capability."""

from .distill import kd_loss, mapping_distance
from .gated_cells import gated_gru_cell, gated_lstm_cell
from .gated_layers import gated_gru_layer, gated_lstm_layer
from .hessian_norm import (activation_with_hessian_norm, fold_batch_norm, hessian_norm_conv1d,
                           hessian_norm_conv2d, hessian_norm_linear)

__all__ = ["gated_gru_cell", "gated_lstm_cell", "gated_gru_layer", "gated_lstm_layer",
           "hessian_norm_linear", "hessian_norm_conv1d", "hessian_norm_conv2d",
           "activation_with_hessian_norm", "fold_batch_norm", "kd_loss", "mapping_distance"]
