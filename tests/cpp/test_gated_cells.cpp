// C++ smoke test: the gated cell ops, called by name through the dispatcher, against ATen's own
// GRU / LSTM cells (sigmoid gate) on random inputs, forward and backward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <array>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const at::Tensor& a, const at::Tensor& b, const char* what) {
  const double err = (a - b).abs().max().item<double>();
  const bool ok = a.sizes() == b.sizes() && err < 1e-10;
  std::printf("%-28s max |diff| = %.3g  %s\n", what, err, ok ? "ok" : "FAIL");
  failures += !ok;
}

template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Opt = std::optional<at::Tensor>;

}  // namespace

int main() {
  at::manual_seed(7);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 5, I = 9, H = 11;

  {  // GRU
    auto x = at::randn({B, I}, f64), h = at::randn({B, H}, f64);
    auto w_ih = at::randn({3 * H, I}, f64), w_hh = at::randn({3 * H, H}, f64);
    auto b_ih = at::randn({3 * H}, f64), b_hh = at::randn({3 * H}, f64);
    auto fwd = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&,
                                                     const Opt&, const Opt&, std::string_view)>(
        "mapopt_native::gated_gru_cell_fwd");
    auto [hy, ws] = fwd.call(x, h, w_ih, w_hh, b_ih, b_hh, "sigmoid");
    expect_close(hy, at::gru_cell(x, h, w_ih, w_hh, b_ih, b_hh), "gru forward");

    // Backward of sum(hy * g) against autograd through ATen's cell.
    auto g = at::randn({B, H}, f64);
    auto bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         std::string_view, bool, std::array<bool, 3>)>(
        "mapopt_native::gated_gru_cell_bwd");
    auto grads = bwd.call(g, x, h, w_ih, w_hh, ws, "sigmoid", true, {true, true, true});
    std::vector<at::Tensor> leaves{x, h, w_ih, w_hh, b_ih, b_hh};
    for (auto& t : leaves) t = t.detach().requires_grad_();
    auto out = at::gru_cell(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5]);
    auto ref = torch::autograd::grad({(out * g).sum()}, leaves);
    expect_close(std::get<0>(grads), ref[0], "gru grad input");
    expect_close(std::get<1>(grads), ref[1], "gru grad hx");
    expect_close(std::get<2>(grads), ref[2], "gru grad weight_ih");
    expect_close(std::get<3>(grads), ref[3], "gru grad weight_hh");
    expect_close(std::get<4>(grads), ref[4], "gru grad bias_ih");
    expect_close(std::get<5>(grads), ref[5], "gru grad bias_hh");
  }

  {  // LSTM
    auto x = at::randn({B, I}, f64), h = at::randn({B, H}, f64), c = at::randn({B, H}, f64);
    auto w_ih = at::randn({4 * H, I}, f64), w_hh = at::randn({4 * H, H}, f64);
    auto b_ih = at::randn({4 * H}, f64), b_hh = at::randn({4 * H}, f64);
    auto fwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const Opt&, const Opt&, std::string_view)>(
        "mapopt_native::gated_lstm_cell_fwd");
    auto [hy, cy, ws] = fwd.call(x, h, c, w_ih, w_hh, b_ih, b_hh, "sigmoid");
    auto [h_ref, c_ref] = at::lstm_cell(x, {h, c}, w_ih, w_hh, b_ih, b_hh);
    expect_close(hy, h_ref, "lstm forward h");
    expect_close(cy, c_ref, "lstm forward c");
  }

  {  // Bad input is an exception with a message, not a crash.
    auto fwd = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&,
                                                     const Opt&, const Opt&, std::string_view)>(
        "mapopt_native::gated_gru_cell_fwd");
    bool threw = false;
    try {
      fwd.call(at::randn({2, 3}), at::randn({2, 4}), at::randn({12, 3}), at::randn({12, 4}),
               std::nullopt, std::nullopt, "relu");
    } catch (const c10::Error& e) {
      threw = std::string(e.what()).find("gate must be one of 'sigmoid', 'gaussian', 'trig'") !=
              std::string::npos;
    }
    std::printf("%-28s %s\n", "unknown gate raises", threw ? "ok" : "FAIL");
    failures += !threw;
  }

  std::printf("%s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
