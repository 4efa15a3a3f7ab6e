"""torch._check mirrors of csrc/common/checks.h, shared by the fake kernels of every capability
(so a compiled model fails at trace time with the kernels' own messages)."""

import torch
from torch import Tensor


def check_floating(t: Tensor, name: str) -> None:
    torch._check(t.dtype.is_floating_point,
                 lambda: f"{name} must have a floating dtype, got {t.dtype}")


def check_like(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    torch._check(t.dtype == ref.dtype, lambda: (
        f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}: all tensors must "
        "share one dtype"))
    torch._check(t.device == ref.device, lambda: (
        f"{name} is on {t.device} but {ref_name} is on {ref.device}: all tensors must be on "
        "one device"))


def check_shape(t: Tensor, name: str, expected, meaning: str) -> None:
    torch._check(tuple(t.shape) == tuple(expected), lambda: (
        f"{name} must have shape {meaning} = {list(expected)}, got {list(t.shape)}"))
