"""Distillation ops (MATH.md §3): fake kernels, autograd, and the public functions kd_loss and
mapping_distance. The C++ side is csrc/distill.h; its checks are mirrored here with torch._check
so a compiled model fails with the same message at trace time."""

from collections.abc import Sequence

import torch
from torch import Tensor

from .checks import check_floating, check_like

_ops = torch.ops.mapopt_native

DISTANCES = ("l2", "kl")
REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")


def _check_kd(student, teacher, target, alpha, distance, temperature):
    """The fake-kernel mirror of check_kd_inputs in csrc/distill.h."""
    torch._check(distance in DISTANCES,
                 lambda: f"distance must be 'l2' or 'kl', got {distance!r}")
    torch._check(0.0 <= alpha <= 1.0, lambda: f"alpha must be in [0, 1], got {alpha}")
    torch._check(0.0 < temperature < float("inf"),
                 lambda: f"temperature must be positive and finite, got {temperature}")
    check_floating(student, "student logits")
    torch._check(student.dim() == 2 and student.shape[1] > 0, lambda: (
        f"student logits must be 2-D (N, C) with C >= 1, got shape {list(student.shape)}"))
    torch._check(teacher.shape == student.shape, lambda: (
        f"teacher logits must have the student's shape (N, C) = {list(student.shape)}, got "
        f"{list(teacher.shape)}"))
    torch._check(teacher.dtype == student.dtype, lambda: (
        f"teacher logits has dtype {teacher.dtype} but student logits has dtype "
        f"{student.dtype}: all tensors must share one dtype"))
    torch._check(teacher.device == student.device, lambda: (
        f"teacher logits is on {teacher.device} but student logits is on {student.device}: all "
        "tensors must be on one device"))
    if target is not None:
        torch._check(target.dtype == torch.int64, lambda: (
            f"target must hold int64 class indices, got dtype {target.dtype}"))
        torch._check(target.dim() == 1 and target.shape[0] == student.shape[0], lambda: (
            f"target must have shape (N,) = ({student.shape[0]},) to match student logits "
            f"{list(student.shape)}, got {list(target.shape)}"))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels (at::opmath_type): float32 for 16-bit inputs. Loss
    and distance values come out in it (a sum of squares leaves float16's range easily)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_accumulation(grad, name, like, like_name):
    """The fake-kernel mirror of check_accumulation in csrc/distill.h."""
    acc = _acc_dtype(like.dtype)
    torch._check(grad.dtype == acc, lambda: (
        f"{name} must have dtype {acc} (the loss's: {like_name} has dtype {like.dtype}), got "
        f"{grad.dtype}"))
    torch._check(grad.device == like.device,
                 lambda: f"{name} is on {grad.device} but {like_name} is on {like.device}")


@torch.library.register_fake("mapopt_native::kd_loss_fwd")
def _(student, teacher, target, alpha, distance, temperature, ignore_index):
    _check_kd(student, teacher, target, alpha, distance, temperature)
    N = student.shape[0]
    acc = _acc_dtype(student.dtype)
    return student.new_empty((N,), dtype=acc), student.new_empty((N, 3), dtype=acc)


@torch.library.register_fake("mapopt_native::kd_loss_bwd")
def _(grad_loss, student, teacher, target, row_stats, alpha, distance, temperature, ignore_index):
    _check_kd(student, teacher, target, alpha, distance, temperature)
    N = student.shape[0]
    torch._check(grad_loss.shape == (N,),
                 lambda: f"grad_loss must have shape (N,) = ({N},), got {list(grad_loss.shape)}")
    torch._check(row_stats.shape == (N, 3), lambda: (
        f"row_stats must have shape (N, 3) = ({N}, 3), got {list(row_stats.shape)}"))
    _check_accumulation(grad_loss, "grad_loss", student, "student logits")
    torch._check(row_stats.dtype == _acc_dtype(student.dtype), lambda: (
        f"row_stats must have dtype {_acc_dtype(student.dtype)} (kd_loss_fwd's), got "
        f"{row_stats.dtype}"))
    return student.new_empty(student.shape)


def _check_coefficient(coefficient, student):
    """The fake-kernel mirror of check_coefficient in csrc/distill.h."""
    torch._check(coefficient.dim() == 0,
                 lambda: f"coefficient must be 0-dim, got shape {list(coefficient.shape)}")
    _check_accumulation(coefficient, "coefficient", student, "student logits")


@torch.library.register_fake("mapopt_native::kd_loss_total")
def _(student, teacher, target, alpha, distance, temperature, ignore_index, coefficient):
    _check_kd(student, teacher, target, alpha, distance, temperature)
    _check_coefficient(coefficient, student)
    return coefficient.new_empty(())


@torch.library.register_fake("mapopt_native::kd_loss_fwd_grad")
def _(student, teacher, target, alpha, distance, temperature, ignore_index, coefficient):
    _check_kd(student, teacher, target, alpha, distance, temperature)
    _check_coefficient(coefficient, student)
    N = student.shape[0]
    return (coefficient.new_empty(()), coefficient.new_empty((N, 3)),
            student.new_empty(student.shape))


# kd_loss_total's autograd kernel is in C++ (csrc/autograd/distill.cpp): on the CPU in float32 /
# float64 its forward writes the gradient too, handed over by the backward.


def _kd_setup_context(ctx, inputs, output):
    student, teacher, target, alpha, distance, temperature, ignore_index = inputs
    _, row_stats = output
    ctx.save_for_backward(student, teacher, target, row_stats)
    ctx.args = (alpha, distance, temperature, ignore_index)
    ctx.mark_non_differentiable(row_stats)


def _kd_backward(ctx, grad_loss, _grad_row_stats):
    student, teacher, target, row_stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _ops.kd_loss_bwd(grad_loss, student, teacher, target, row_stats, *ctx.args)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("mapopt_native::kd_loss_fwd", _kd_backward,
                                setup_context=_kd_setup_context)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None,
            alpha: float = 0.5, *, distance: str = "l2", temperature: float = 1.0,
            ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Knowledge-distillation loss L = (1 - α)·CE(s, y) + α·D(s, t), MATH.md §3, fused.

    student_logits, teacher_logits: (..., C), one shape; leading dimensions are flattened (a
    sequence model's (B, T, C) is B·T samples). target: (...,) int64 class indices, or None for the
    distance term alone (L = D, α unused). distance: "l2" (D_b = ‖s_b - t_b‖²) or "kl"
    (D_b = T² KL(softmax(t/T) ‖ softmax(s/T))); temperature T only affects "kl".

    Samples whose target is `ignore_index` are left out of both terms; "mean" divides by the count
    of the others (nan if there are none, as F.cross_entropy), "sum" adds them up, "none" returns
    one loss per sample (shape (...,)), 0 where ignored.

    Note that "l2" with "mean" is C × F.mse_loss(s, t) (the squared norm is summed over the C
    features of a sample, MSE averages over them too).

    float16 / bfloat16 logits give a float32 loss (as autocast runs torch's losses in float32);
    the gradient has the logits' dtype. The teacher receives no gradient.

    The forward reads the logits once (online softmax) and keeps 3 numbers per sample; a backward
    pass reads them once more and writes the gradient. On the CPU in float32 / float64, with
    "mean" / "sum" and a gradient to come, the forward writes each row's gradient right after the row's totals (while
    the row is in cache) and the backward hands it over, scaled in place unless the incoming
    gradient is exactly 1 (not under activation checkpointing, torch.compile or vmap, which take
    the backward pass). Either way the gradient is the only logits-size buffer allocated."""
    _check_reduction(reduction)
    # Plain raises (not torch._check): these run in the traced function itself under compile.
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError("student_logits must be (..., C) with C >= 1, got shape "
                         f"{list(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits "
                         f"{list(student_logits.shape)}, got {list(teacher_logits.shape)}")
    if target is not None and target.shape != student_logits.shape[:-1]:
        raise ValueError(f"target must have shape {list(student_logits.shape[:-1])} "
                         f"(student_logits {list(student_logits.shape)} without its class dim), "
                         f"got {list(target.shape)}")
    C = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, C)
    t = teacher_logits.reshape(-1, C)
    y = target.reshape(-1) if target is not None else None
    args = (s, t, y, float(alpha), distance, float(temperature), int(ignore_index))
    if reduction == "none":
        rows, _ = _ops.kd_loss_fwd(*args)
        return rows.reshape(lead)
    # ∂total/∂L_b, one number for every row: 1 ("sum") or 1/count ("mean"; inf when no row
    # counts, giving nan as F.cross_entropy).
    acc = _acc_dtype(s.dtype)
    if reduction == "sum":
        coefficient = torch.ones((), dtype=acc, device=s.device)
    elif y is None:
        coefficient = torch.full((), s.shape[0], dtype=acc, device=s.device).reciprocal()
    else:
        coefficient = (y != ignore_index).sum().to(acc).reciprocal()
    return _ops.kd_loss_total(*args, coefficient)


# ---------------------------------------------------------------- mapping_distance


def _check_pairs(students, teachers):
    """The fake-kernel mirror of check_pairs in csrc/distill.h."""
    torch._check(len(students) > 0, lambda: "students must hold at least one tensor")
    torch._check(len(students) == len(teachers), lambda: (
        f"students and teachers must have one length, got {len(students)} and {len(teachers)}"))
    ref = students[0]
    check_floating(ref, "students[0]")
    for j, (s, t) in enumerate(zip(students, teachers)):
        torch._check(s.dim() >= 1,
                     lambda: f"students[{j}] must have a batch dimension, got a scalar")
        torch._check(t.shape == s.shape, lambda: (
            f"teachers[{j}] must have the shape of students[{j}] = {list(s.shape)}, got "
            f"{list(t.shape)}"))
        for x, name in ((s, f"students[{j}]"), (t, f"teachers[{j}]")):
            check_like(x, name, ref, "students[0]")


@torch.library.register_fake("mapopt_native::mapping_distance_fwd")
def _(students, teachers):
    _check_pairs(students, teachers)
    return students[0].new_empty((len(students),), dtype=_acc_dtype(students[0].dtype))


@torch.library.register_fake("mapopt_native::mapping_distance_bwd")
def _(grad_distances, students, teachers):
    _check_pairs(students, teachers)
    _check_accumulation(grad_distances, "grad_distances", students[0], "students[0]")
    return [s.new_empty(s.shape) for s in students]


def _check_coefficients(coefficients, students):
    """The fake-kernel mirror of check_coefficients in csrc/distill.h."""
    torch._check(coefficients.shape == (len(students),), lambda: (
        f"coefficients must have shape ({len(students)},) (one per pair), got "
        f"{list(coefficients.shape)}"))
    _check_accumulation(coefficients, "coefficients", students[0], "students[0]")


@torch.library.register_fake("mapopt_native::mapping_distance_total")
def _(students, teachers, coefficients):
    _check_pairs(students, teachers)
    _check_coefficients(coefficients, students)
    return coefficients.new_empty(())


@torch.library.register_fake("mapopt_native::mapping_distance_fwd_grad")
def _(students, teachers, coefficients):
    _check_pairs(students, teachers)
    _check_coefficients(coefficients, students)
    return coefficients.new_empty((len(students),)), [s.new_empty(s.shape) for s in students]


# The autograd kernels of mapping_distance_fwd and mapping_distance_total are in C++
# (csrc/autograd/distill.cpp): for many small pairs a Python autograd formula cost several times
# the kernels, and on the CPU in float32 / float64 the total's forward writes the gradient in the
# same pass as the sums.


def mapping_distance(students: Sequence[Tensor], teachers: Sequence[Tensor], *,
                     weights: Sequence[float] | Tensor | None = None,
                     reduction: str = "mean") -> Tensor:
    """Mean squared distances of several (student, teacher) mappings in one native pass,
    MATH.md §3: D_j = (1/B_j) Σ_b ‖s_j[b] - t_j[b]‖², the norm over every non-batch element.

    students[j] and teachers[j] share one shape (B_j, ...); pairs may differ in shape, and all
    tensors share one dtype and device; float16 / bfloat16 pairs give float32 distances (a sum of
    squares over a feature map leaves float16's range easily), gradients in the pairs' dtype. A
    pair with B_j = 0 gives D_j = 0. The teachers receive no gradient. weights: one per pair
    (default 1). reduction: "none" returns the vector (D_j) (weights applied), "sum" Σ_j w_j D_j,
    "mean" Σ_j w_j D_j / number of pairs. On the CPU in float32 / float64, "sum" and "mean"
    write the gradient in the forward pass (kd_loss's docstring says when)."""
    _check_reduction(reduction)
    students, teachers = list(students), list(teachers)
    if not students:  # the dispatcher needs a tensor to pick a kernel
        raise ValueError("students must hold at least one tensor")
    P = len(students)
    dtype = _acc_dtype(students[0].dtype)
    w = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=dtype, device=students[0].device)
        if w.shape != (P,):
            raise ValueError(f"weights must hold one weight per pair ({P}), got shape "
                             f"{list(w.shape)}")
    if reduction == "none":
        d = _ops.mapping_distance_fwd(students, teachers)  # the autograd formula skips teachers
        return d if w is None else d * w
    # Σ_j c_j D_j in one op (on the CPU in float32 / float64 its forward also writes the gradient);
    # learnable weights get theirs (D_j) from its autograd kernel.
    c = torch.ones(P, dtype=dtype, device=students[0].device) if w is None else w
    return _ops.mapping_distance_total(students, teachers, c if reduction == "sum" else c / P)
