// mapopt_native._C: what is not an op (build facts, the gate and activation names, and for the
// benchmarks' floor the CPU layers' projection block size and their product over all steps).
// Kept apart from registration.cpp so the CMake library (C++ users, no Python) links the ops
// without pybind.
// MAPOPT_WITH_CUDA, MAPOPT_CUDA_ARCH, MAPOPT_CPU_ISA and MAPOPT_TORCH_VERSION are set by setup.py.
#include <torch/extension.h>

#include "common/activations.h"
#include "common/gates.h"
#include "cpu/onednn_linear.h"
#include "cpu/scratch.h"

#ifndef MAPOPT_WITH_CUDA
#define MAPOPT_WITH_CUDA 0
#endif
#ifndef MAPOPT_CUDA_ARCH
#define MAPOPT_CUDA_ARCH ""
#endif
#ifndef MAPOPT_TORCH_VERSION
#define MAPOPT_TORCH_VERSION "unknown"
#endif
#ifndef MAPOPT_CPU_ISA
#define MAPOPT_CPU_ISA "default"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mapopt_native native extension: build information (the ops live in torch.ops)";
  m.def("with_cuda", [] { return static_cast<bool>(MAPOPT_WITH_CUDA); });
  m.def("cuda_arch", [] { return std::string(MAPOPT_CUDA_ARCH); });
  m.def("cpu_isa", [] { return std::string(MAPOPT_CPU_ISA); });
  m.def("torch_version", [] { return std::string(MAPOPT_TORCH_VERSION); });
  m.def("cpu_projection_block_bytes", [] { return mapopt::cpu::kProjectionBlockBytes; });
  m.def(
      "cpu_matmul",
      [](const at::Tensor& a, const at::Tensor& b) {
        TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
                          "cpu_matmul: a and b must be 2-D with a.size(1) == b.size(0), got ",
                          a.sizes(), " and ", b.sizes());
        TORCH_CHECK_VALUE(a.device().is_cpu() && b.device().is_cpu() &&
                              a.scalar_type() == b.scalar_type(),
                          "cpu_matmul: a and b must be CPU tensors of one dtype, got ",
                          a.scalar_type(), " on ", a.device(), " and ", b.scalar_type(), " on ",
                          b.device());
        at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
        mapopt::cpu::onednn_matmul_into(out, a, b, /*accumulate=*/false);
        return out;
      },
      pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gate_names", [] {
    pybind11::tuple names(mapopt::kNumGates);
    for (int i = 0; i < mapopt::kNumGates; ++i) names[i] = mapopt::kGateNames[i];
    return names;
  });
  m.def("activation_names", [] {
    pybind11::tuple names(mapopt::kNumActivations);
    for (int i = 0; i < mapopt::kNumActivations; ++i) names[i] = mapopt::kActivationNames[i];
    return names;
  });
}
