"""mapopt_native: fused gated recurrent cells and layers (mapopt_native.nn), Hessian-norm pruning
importance (mapopt_native.prune) and distillation losses (mapopt_native.distill) for PyTorch, as
C++/CUDA custom ops under a thin Python layer."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # registers the torch.ops.mapopt_native.* ops
from . import ops  # noqa: F401  (fake kernels and autograd formulas of those ops)
from . import distill, nn, prune, reference  # noqa: F401

# The gate families (MATH.md §1), in the order the native code numbers them.
GATES = tuple(_C.gate_names())
# The activations of the Hessian-norm criterion (MATH.md §2.1), likewise.
ACTIVATIONS = tuple(_C.activation_names())


def build_info():
    """What this build of the extension contains: {"cpu", "cuda", "cuda_arch", "cpu_isa", "torch"}.

    "cuda" says whether CUDA kernels were compiled in (not whether a GPU is present)."""
    arch = _C.cuda_arch()
    return {
        "cpu": True,
        "cuda": _C.with_cuda(),
        "cuda_arch": [a for a in arch.split(";") if a],
        "cpu_isa": _C.cpu_isa(),
        "torch": _C.torch_version(),
    }


__all__ = ["ACTIVATIONS", "GATES", "build_info", "distill", "nn", "ops", "prune",
           "reference"]
