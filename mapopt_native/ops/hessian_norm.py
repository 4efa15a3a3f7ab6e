"""Hessian-norm importance ops (MATH.md §2.1, §2.2): fake kernels, autograd, the public functions.

The scores I_k = E_x ‖∇²_x f_k(x)‖_F² of the units of a layer followed by an activation are
computed in closed form: the layer's product (ATen), then one fused pass over its output. The ops
validate their inputs in C++ (csrc/hessian_norm.h); the fake kernels repeat those checks with
torch._check so a compiled model fails with the same message at trace time.

Conventions:
  * Piecewise-linear activations ('relu', 'leaky_relu', 'identity') have a zero Hessian almost
    everywhere, so they need a smoothing scale `sigma` > 0 and are scored Gaussian-smoothed
    (§2.2). 'identity' is accepted on the same terms for uniformity, but an affine map stays
    affine when smoothed: its scores are exactly 0 (they cannot rank units).
  * `reduction="mean"` divides the batch sum by the number of rows (input rows for a dense layer,
    batch entries for a convolution); an empty batch then gives NaN (0 / 0, as torch.mean of
    nothing), never a silent 0. `reduction="sum"` gives 0 and is what a caller streaming a data
    set sums before dividing by the count.
  * The scores are not differentiable (they are detached).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _C
from .checks import check_floating, check_like, check_shape

_ops = torch.ops.mapopt_native
ACTIVATIONS = tuple(_C.activation_names())
PIECEWISE_LINEAR = ("relu", "leaky_relu", "identity")


def _check_activation_name(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(repr(a) for a in ACTIVATIONS)}, "
                         f"got {activation!r}")


def _check_activation(activation: str, sigma: float | None) -> None:
    """The mirror of parse_activation in csrc/hessian_norm.h."""
    _check_activation_name(activation)
    if activation in PIECEWISE_LINEAR:
        if sigma is None:
            raise ValueError(
                f"activation={activation!r} is piecewise linear: its exact Hessian is zero almost "
                "everywhere, so the criterion cannot rank units. Pass sigma > 0 to score the "
                "Gaussian-smoothed activation (MATH.md §2.2)")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
    elif sigma is not None:
        raise ValueError(
            "sigma smooths the piecewise-linear activations ('relu', 'leaky_relu', 'identity') "
            f"only; activation={activation!r} has an exact Hessian: pass sigma=None")


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _check_bias(bias, units, meaning, input):
    if bias is not None:
        check_shape(bias, "bias", (units,), meaning)
        check_like(bias, "bias", input, "input")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("mapopt_native::hessian_norm_linear")
def _(input, weight, bias, activation, sigma, negative_slope, alpha, reduction):
    _check_activation(activation, sigma)
    _check_reduction(reduction)
    check_floating(input, "input")
    torch._check(input.dim() >= 1, lambda: "input must have shape (..., in_features), got a scalar")
    torch._check(weight.dim() == 2, lambda: (
        f"weight must have shape (out_features, in_features), got {list(weight.shape)}"))
    torch._check(input.shape[-1] == weight.shape[1], lambda: (
        f"input has {input.shape[-1]} features (shape {list(input.shape)}) but weight "
        f"{list(weight.shape)} expects in_features={weight.shape[1]}"))
    check_like(weight, "weight", input, "input")
    _check_bias(bias, weight.shape[0], "(out_features,)", input)
    return input.new_empty((weight.shape[0],))


def _check_conv_param(p, dims, name, min_value):
    torch._check(len(p) in (1, dims), lambda: (
        f"{name} must have 1 or {dims} values (one per spatial dim), got {list(p)}"))
    torch._check(all(v >= min_value for v in p),
                 lambda: f"{name} must be >= {min_value} in every dim, got {list(p)}")


@torch.library.register_fake("mapopt_native::hessian_norm_conv")
def _(input, weight, bias, stride, padding, dilation, groups, activation, sigma, negative_slope,
      alpha, reduction):
    _check_activation(activation, sigma)
    _check_reduction(reduction)
    check_floating(input, "input")
    torch._check(weight.dim() in (3, 4), lambda: (
        "weight must have shape (out_channels, in_channels/groups, *kernel) with 1 or 2 spatial "
        f"dims, got {list(weight.shape)}"))
    dims = weight.dim() - 2
    torch._check(input.dim() == weight.dim(), lambda: (
        f"input must have shape (batch, in_channels, {'length' if dims == 1 else 'height, width'})"
        f" for weight {list(weight.shape)}, got {list(input.shape)}"))
    torch._check(groups >= 1, lambda: f"groups must be >= 1, got {groups}")
    C = weight.shape[0]
    torch._check(C % groups == 0, lambda: (
        f"out_channels (weight {list(weight.shape)}) must be divisible by groups={groups}"))
    torch._check(input.shape[1] == weight.shape[1] * groups, lambda: (
        f"input has {input.shape[1]} channels (shape {list(input.shape)}) but weight "
        f"{list(weight.shape)} with groups={groups} expects "
        f"in_channels={weight.shape[1] * groups}"))
    check_like(weight, "weight", input, "input")
    _check_bias(bias, C, "(out_channels,)", input)
    _check_conv_param(stride, dims, "stride", 1)
    _check_conv_param(padding, dims, "padding", 0)
    _check_conv_param(dilation, dims, "dilation", 1)
    return input.new_empty((C,))


def _check_z_s(z, s):
    check_floating(z, "z")
    torch._check(z.dim() >= 1,
                 lambda: "z must have a batch dimension (batch, *features), got a scalar")
    check_like(s, "s", z, "z")
    features = tuple(z.shape[1:])
    torch._check(s.dim() <= len(features) and all(
        a in (1, b) for a, b in zip(reversed(s.shape), reversed(features))), lambda: (
        f"s {list(s.shape)} must broadcast against z.shape[1:] = {list(features)} "
        f"(z has shape {list(z.shape)})"))


@torch.library.register_fake("mapopt_native::activation_with_hessian_norm_fwd")
def _(z, s, activation, sigma, negative_slope, alpha):
    _check_activation(activation, sigma)
    _check_z_s(z, s)
    return z.new_empty(z.shape), z.new_empty(z.shape[1:], dtype=_opmath(z.dtype))


@torch.library.register_fake("mapopt_native::activation_with_hessian_norm_bwd")
def _(grad_output, z, activation, negative_slope, alpha):
    _check_activation_name(activation)
    check_floating(z, "z")
    check_shape(grad_output, "grad_output", z.shape, "z.shape")
    check_like(grad_output, "grad_output", z, "z")
    return z.new_empty(z.shape)


# ---------------------------------------------------------------- autograd (w.r.t. z only)


def _setup_context(ctx, inputs, output):
    z, _, activation, _, negative_slope, alpha = inputs
    ctx.save_for_backward(z)
    ctx.activation, ctx.negative_slope, ctx.alpha = activation, negative_slope, alpha
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_output, _grad_term):
    (z,) = ctx.saved_tensors
    grad_z = None
    if ctx.needs_input_grad[0]:
        grad_z = _ops.activation_with_hessian_norm_bwd(grad_output, z, ctx.activation,
                                                       ctx.negative_slope, ctx.alpha)
    return grad_z, None, None, None, None, None


torch.library.register_autograd("mapopt_native::activation_with_hessian_norm_fwd", _backward,
                                setup_context=_setup_context)


# ---------------------------------------------------------------- public functions


def fold_batch_norm(weight: Tensor, bias: Tensor | None, batch_norm) -> tuple[Tensor, Tensor]:
    """The weight and bias of layer→BatchNorm (eval statistics) as one layer (MATH.md §2.1):
    w_c ← a_c w_c, b_c ← a_c (b_c - μ_c) + β_c, a_c = γ_c / sqrt(var_c + eps). New tensors; the
    inputs are not modified.

    batch_norm: an eval-mode nn.BatchNorm1d / BatchNorm2d with running statistics, or a tuple
    (running_mean, running_var, weight_or_None, bias_or_None, eps)."""
    if isinstance(batch_norm, torch.nn.modules.batchnorm._BatchNorm):
        if batch_norm.training:
            raise ValueError("batch_norm is in training mode, where it normalises with batch "
                             "statistics; its running statistics are folded: call .eval() first")
        if batch_norm.running_mean is None:
            raise ValueError("batch_norm has no running statistics (track_running_stats=False), "
                             "so there is nothing to fold")
        stats = (batch_norm.running_mean, batch_norm.running_var, batch_norm.weight,
                 batch_norm.bias, batch_norm.eps)
    elif isinstance(batch_norm, Sequence) and len(batch_norm) == 5:
        stats = tuple(batch_norm)
    else:
        raise TypeError("batch_norm must be an nn.BatchNorm1d/2d or a tuple (running_mean, "
                        f"running_var, weight, bias, eps), got {type(batch_norm).__name__}")
    mean, var, gamma, beta, eps = stats
    C = weight.shape[0]
    for t, name in ((mean, "running_mean"), (var, "running_var"), (gamma, "weight"),
                    (beta, "bias")):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"batch_norm {name} must have shape ({C},) to match the layer's "
                             f"{C} output units (weight {list(weight.shape)}), got {list(t.shape)}")
    a = torch.rsqrt(var.to(weight.dtype) + eps)
    if gamma is not None:
        a = a * gamma.to(weight.dtype)
    folded_w = weight * a.reshape((C,) + (1,) * (weight.dim() - 1))
    b = -mean.to(weight.dtype) if bias is None else bias - mean.to(weight.dtype)
    folded_b = a * b
    if beta is not None:
        folded_b = folded_b + beta.to(weight.dtype)
    return folded_w, folded_b


def _prepared(weight, bias, batch_norm):
    """Detached (scores are not differentiated), BatchNorm folded."""
    if batch_norm is not None:
        weight, bias = fold_batch_norm(weight, bias, batch_norm)
    return weight.detach(), None if bias is None else bias.detach()


def hessian_norm_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None,
                        activation: str = "tanh", *, sigma: float | None = None,
                        negative_slope: float = 0.01, alpha: float = 1.0, batch_norm=None,
                        reduction: str = "mean") -> Tensor:
    """Per-unit Hessian-norm importance of f = activation(input Wᵀ + b) (MATH.md §2.1),
    I_k = ‖w_k‖⁴ · mean over rows of φ''(z_k)², shape (out_features,).

    input (..., in_features), leading dims flattened as the batch; weight (out, in); batch_norm: an
    eval-mode BatchNorm between the layer and the activation (fold_batch_norm); sigma: the
    smoothing scale, required by the piecewise-linear activations; reduction "mean" or "sum"."""
    weight, bias = _prepared(weight, bias, batch_norm)
    return _ops.hessian_norm_linear(input.detach(), weight, bias, activation, sigma,
                                    negative_slope, alpha, reduction)


def _int_tuple(value, dims: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * dims
    value = list(value)
    if len(value) != dims or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or {dims} ints, got {value}")
    return value


def _padding(padding, weight: Tensor, stride: list[int], dilation: list[int], dims: int):
    if not isinstance(padding, str):
        return _int_tuple(padding, dims, "padding")
    if padding == "valid":
        return [0] * dims
    if padding != "same":
        raise ValueError(f"padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"padding='same' needs stride 1 (as torch's convolutions), got {stride}")
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if any(t % 2 for t in totals):
        # The scores count only taps that land inside the input, so the extra pad must be known
        # exactly; the op takes symmetric padding.
        raise ValueError(
            f"padding='same' with kernel {list(weight.shape[2:])} and dilation {dilation} pads "
            "one side more than the other, which these ops do not support: pad the input "
            "explicitly and pass padding=0, or use an odd kernel")
    return [t // 2 for t in totals]


def _conv(dims, input, weight, bias, stride, padding, dilation, groups, activation, sigma,
          negative_slope, alpha, batch_norm, reduction):
    if weight.dim() != dims + 2:
        raise ValueError(f"weight must have shape (out_channels, in_channels/groups, *kernel) "
                         f"with {dims} spatial dim(s), got {list(weight.shape)}")
    stride = _int_tuple(stride, dims, "stride")
    dilation = _int_tuple(dilation, dims, "dilation")
    padding = _padding(padding, weight, stride, dilation, dims)
    weight, bias = _prepared(weight, bias, batch_norm)
    return _ops.hessian_norm_conv(input.detach(), weight, bias, stride, padding, dilation, groups,
                                  activation, sigma, negative_slope, alpha, reduction)


def hessian_norm_conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                        padding=0, dilation=1, groups: int = 1, activation: str = "tanh", *,
                        sigma: float | None = None, negative_slope: float = 0.01,
                        alpha: float = 1.0, batch_norm=None, reduction: str = "mean") -> Tensor:
    """Per-channel Hessian-norm importance of f = activation(conv2d(input, W, b, ...)) (MATH.md
    §2.1): I_c = mean over the batch of Σ_p φ''(z_{c,p})² s_{c,p}², s = conv(ones, W², ...) (exact
    at padded borders), shape (out_channels,). input (B, C_in, H, W); stride, padding, dilation: int
    or pair (padding also 'valid', or 'same' where that pads symmetrically). Other arguments as
    hessian_norm_linear."""
    return _conv(2, input, weight, bias, stride, padding, dilation, groups, activation, sigma,
                 negative_slope, alpha, batch_norm, reduction)


def hessian_norm_conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                        padding=0, dilation=1, groups: int = 1, activation: str = "tanh", *,
                        sigma: float | None = None, negative_slope: float = 0.01,
                        alpha: float = 1.0, batch_norm=None, reduction: str = "mean") -> Tensor:
    """hessian_norm_conv2d for conv1d: input (B, C_in, L), weight (C_out, C_in/groups, k)."""
    return _conv(1, input, weight, bias, stride, padding, dilation, groups, activation, sigma,
                 negative_slope, alpha, batch_norm, reduction)


def activation_with_hessian_norm(z: Tensor, s: Tensor, accumulator: Tensor, activation: str, *,
                                 sigma: float | None = None, negative_slope: float = 0.01,
                                 alpha: float = 1.0) -> Tensor:
    """φ(z), and in the same pass over z adds Σ over dim 0 (the batch) of the per-element term
    φ''(z)² s² (the smoothed term for piecewise-linear activations, §2.2) into `accumulator` in
    place.

    z: a layer's output (batch, *features); s broadcasts against z.shape[1:] (dense: ‖w_k‖², shape
    (F,); convolution: s_{c,p}, shape (C, *spatial)); accumulator: shape z.shape[1:], any floating
    dtype (float32 or float64 for long streams), z's device. The output is differentiable with
    respect to z (backward φ'(z) · grad); the accumulated term is not."""
    if not accumulator.dtype.is_floating_point:
        raise TypeError(f"accumulator must have a floating dtype, got {accumulator.dtype}")
    if accumulator.device != z.device:
        raise ValueError(f"accumulator is on {accumulator.device} but z is on {z.device}")
    if z.dim() >= 1 and tuple(accumulator.shape) != tuple(z.shape[1:]):
        raise ValueError(f"accumulator must have shape z.shape[1:] = {list(z.shape[1:])}, got "
                         f"{list(accumulator.shape)}")
    out, term = _ops.activation_with_hessian_norm_fwd(z, s, activation, sigma, negative_slope,
                                                      alpha)
    accumulator.add_(term)
    return out
