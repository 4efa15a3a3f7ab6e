"""Shared test settings: devices, dtypes, and the tolerance table (per dtype, for comparisons of
a native op with an independent reference computed in the same dtype)."""

import zlib

import pytest
import torch

import mapopt_native

HAS_CUDA = torch.cuda.is_available() and mapopt_native.build_info()["cuda"]

# (rtol, atol): float32 leaves room for a different summation order in the matrix products and
# SLEEF vs libm transcendental functions; float64 for rounding only.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# (device, dtype) of the runs compared with the float64 CPU op on the same rounded values, which
# its own tests check against independent references: every pair but that op itself. 16-bit
# inputs run in float32: on CUDA in the kernels, on the CPU on float32 copies.
AGAINST_CPU_FLOAT64 = ([("cpu", t) for t in CUDA_DTYPES if t != torch.float64]
                       + [pytest.param("cuda", t, marks=pytest.mark.cuda) for t in CUDA_DTYPES])


def assert_close(actual, expected, dtype=None, scale=1.0):
    """assert_close with the table's tolerance for `dtype` (default: expected's), times `scale`
    for quantities that accumulate over a reduction (weight gradients)."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of the extension")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random data per test, reproducible per test name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
