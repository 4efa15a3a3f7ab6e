"""Builds mapopt_native._C: the CPU kernels always, the CUDA kernels whenever torch is a CUDA build
and nvcc is found (no GPU needed to compile them).

Environment:
  MAPOPT_CUDA=0         CPU-only build; MAPOPT_CUDA=1 fails loudly when CUDA can't be built.
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0+PTX").
  MAPOPT_CPU_ISA        SIMD level of the CPU kernels: avx512, avx2 or default (scalar vectors);
                        by default the best one this machine supports. The extension is built from
                        source for the machine it runs on; set default for a portable binary.
  MAX_JOBS              parallel compile jobs (ninja).
"""

import glob
import os
import shutil

import torch
from setuptools import setup


def find_cuda_home():
    """The CUDA toolkit root: the first candidate with both nvcc and libcudart. torch's own guess
    (the parent of the `nvcc` on PATH) fails when that nvcc is a wrapper script elsewhere."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if shutil.which("nvcc"):
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and (
                glob.glob(os.path.join(root, "lib64", "libcudart.so*"))
                or glob.glob(os.path.join(root, "lib", "libcudart.so*"))):
            return root
    return None


if find_cuda_home():
    os.environ["CUDA_HOME"] = find_cuda_home()

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH = "8.0;9.0+PTX"

# Flags that let ATen's Vectorized<T> use the given instruction set (as ATen's own kernels do).
CPU_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "avx2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "default": [],
}


def cuda_wanted():
    setting = os.environ.get("MAPOPT_CUDA", "")
    available = torch.version.cuda is not None and CUDA_HOME is not None and (
        shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if setting == "0":
        return False
    if setting == "1" and not available:
        raise RuntimeError(
            f"MAPOPT_CUDA=1 but CUDA can't be built: torch.version.cuda={torch.version.cuda}, "
            f"CUDA_HOME={CUDA_HOME}")
    return bool(available)


def detect_cpu_isa():
    chosen = os.environ.get("MAPOPT_CPU_ISA")
    if chosen:
        if chosen not in CPU_ISA_FLAGS:
            raise RuntimeError(f"MAPOPT_CPU_ISA must be one of {sorted(CPU_ISA_FLAGS)}, got {chosen!r}")
        return chosen
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


def cuda_library_include_dirs():
    """Headers of the CUDA math libraries (cuBLAS, cuSPARSE, ...) that ATen's CUDA headers include.
    A CUDA toolkit may ship without them; torch's pip wheels bring them as nvidia-* packages."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                  if os.path.exists(os.path.join(d, "cusparse.h")))


def make_extension():
    with_cuda = cuda_wanted()
    isa = detect_cpu_isa()
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    sources = (["csrc/registration.cpp", "csrc/python_module.cpp"]
               + sorted(glob.glob("csrc/autograd/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp")))
    macros = [
        ("MAPOPT_WITH_CUDA", "1" if with_cuda else "0"),
        ("MAPOPT_CUDA_ARCH", f'"{arch if with_cuda else ""}"'),
        ("MAPOPT_CPU_ISA", f'"{isa}"'),
        ("MAPOPT_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    # -fopenmp: ATen's at::parallel_for is a header template that runs its body on one thread
    # unless the extension itself is compiled with OpenMP; linked, it shares torch's libgomp.
    cxx = ["-O3", "-std=c++20", "-fopenmp"] + CPU_ISA_FLAGS[isa]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension("mapopt_native._C", sources, define_macros=macros,
                             include_dirs=cuda_library_include_dirs(),
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             extra_link_args=["-fopenmp"])
    return CppExtension("mapopt_native._C", sources, define_macros=macros,
                        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


# Metadata and packages live in pyproject.toml.
setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
