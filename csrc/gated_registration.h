// Registers the gated cell and layer ops for one dispatch key, with backend K (the pointwise
// kernels and projections of csrc/cpu or csrc/cuda).
#pragma once

#include <torch/library.h>

#include "gated_cells.h"
#include "gated_layers.h"

namespace mapopt {

template <class K>
void register_gated_ops(torch::Library& m) {
  m.impl("gated_gru_cell_fwd", &gated_gru_cell_fwd<K>);
  m.impl("gated_gru_cell_bwd", &gated_gru_cell_bwd<K>);
  m.impl("gated_lstm_cell_fwd", &gated_lstm_cell_fwd<K>);
  m.impl("gated_lstm_cell_bwd", &gated_lstm_cell_bwd<K>);
  m.impl("gated_gru_seq_fwd", &gated_gru_seq_fwd<K>);
  m.impl("gated_gru_seq_bwd", &gated_gru_seq_bwd<K>);
  m.impl("gated_lstm_seq_fwd", &gated_lstm_seq_fwd<K>);
  m.impl("gated_lstm_seq_bwd", &gated_lstm_seq_bwd<K>);
}

}  // namespace mapopt
