"""Hessian-norm importance ops (MATH.md §2.1, §2.2): the closed forms against torch.func.hessian
per sample, the smoothed piecewise-linear ones against a Monte-Carlo estimate, the fused kernels
against the eager reference, and the fused activation against torch.nn.functional."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mapopt_native
from mapopt_native import reference
from mapopt_native.ops import (activation_with_hessian_norm, fold_batch_norm, hessian_norm_conv1d,
                               hessian_norm_conv2d, hessian_norm_linear)

from conftest import AGAINST_CPU_FLOAT64, CPU_DTYPES, assert_close

ops = torch.ops.mapopt_native
SMOOTH = ("tanh", "sigmoid", "softplus", "silu", "gelu", "elu")
SMOOTHED = ("relu", "leaky_relu")
assert set(SMOOTH + SMOOTHED + ("identity",)) == set(mapopt_native.ACTIVATIONS)
# Not the defaults, so that a constant dropped on the way to the kernel shows.
CONST = {"negative_slope": 0.2, "alpha": 0.7}
CONV = {1: (F.conv1d, hessian_norm_conv1d), 2: (F.conv2d, hessian_norm_conv2d)}


def sigma_for(activation):
    return 0.6 if activation in SMOOTHED + ("identity",) else None


def phi(activation):
    return lambda z: reference.activation(activation, z, **CONST)


def exact_scores(f, xs):
    """mean over the samples xs of ‖∇²_x f_k(x)‖_F² for every output element k of f (one
    sample -> output of any shape), by torch.func.hessian: shape f's output."""
    H = torch.func.vmap(torch.func.hessian(f))(xs)
    in_dims = xs.dim() - 1
    return H.pow(2).flatten(H.dim() - 2 * in_dims).sum(-1).mean(0)


def conv_layer(dims, x_shape, c_out, kernel, groups, dtype=torch.float64, bias=True):
    x = torch.randn(x_shape, dtype=dtype)
    w = 0.6 * torch.randn((c_out, x_shape[1] // groups) + kernel, dtype=dtype)
    b = torch.randn(c_out, dtype=dtype) if bias else None
    return x, w, b


# ---------------------------------------------------------------- closed forms vs torch.func


@pytest.mark.parametrize("activation", SMOOTH)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_exact_hessian(activation, bias):
    B, I, O = 5, 4, 3
    x = torch.randn(B, I, dtype=torch.float64)
    w = 0.7 * torch.randn(O, I, dtype=torch.float64)
    b = torch.randn(O, dtype=torch.float64) if bias else None
    expected = exact_scores(lambda v: phi(activation)(F.linear(v, w, b)), x)
    got = hessian_norm_linear(x, w, b, activation, **CONST)
    assert expected.max() > 1e-3
    assert_close(got, expected)


CONV2D_GEOMETRIES = [  # stride, padding, dilation, groups
    (1, 1, 1, 1),
    (2, 1, 1, 2),
    (1, 2, 2, 1),
    ((2, 1), (0, 2), (1, 2), 2),
]


@pytest.mark.parametrize("geometry", CONV2D_GEOMETRIES)
@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_conv2d_matches_exact_hessian(geometry, activation):
    stride, padding, dilation, groups = geometry
    x, w, b = conv_layer(2, (2, 4, 5, 6), 4, (3, 2), groups)

    def f(v):
        return phi(activation)(F.conv2d(v[None], w, b, stride, padding, dilation, groups))[0]

    expected = exact_scores(f, x).flatten(1).sum(1)
    got = hessian_norm_conv2d(x, w, b, stride, padding, dilation, groups, activation, **CONST)
    assert expected.max() > 1e-3
    assert_close(got, expected)


@pytest.mark.parametrize("activation", SMOOTH)
def test_conv2d_every_activation_padded(activation):
    x, w, b = conv_layer(2, (2, 2, 4, 4), 3, (3, 3), 1)

    def f(v):
        return phi(activation)(F.conv2d(v[None], w, b, 1, 1))[0]

    expected = exact_scores(f, x).flatten(1).sum(1)
    assert_close(hessian_norm_conv2d(x, w, b, 1, 1, activation=activation, **CONST), expected)


@pytest.mark.parametrize("geometry", [(1, 0, 1, 1), (2, 1, 1, 3), (1, 3, 2, 1), (3, 2, 2, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_matches_exact_hessian(geometry, bias):
    stride, padding, dilation, groups = geometry
    x, w, b = conv_layer(1, (3, 6, 9), 6, (3,), groups, bias=bias)

    def f(v):
        return torch.sigmoid(F.conv1d(v[None], w, b, stride, padding, dilation, groups))[0]

    expected = exact_scores(f, x).sum(1)
    got = hessian_norm_conv1d(x, w, b, stride, padding, dilation, groups, "sigmoid")
    assert_close(got, expected)


def random_batch_norm(cls, C, dtype=torch.float64):
    bn = cls(C, eps=1e-3, dtype=dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C))
        bn.running_var.copy_(torch.rand(C) + 0.5)
        bn.weight.copy_(torch.randn(C))
        bn.bias.copy_(torch.randn(C))
    return bn.eval().requires_grad_(False)


@pytest.mark.parametrize("activation", ["silu", "elu"])
def test_conv_batch_norm_chain_matches_exact_hessian(activation):
    x, w, b = conv_layer(2, (2, 3, 5, 5), 4, (3, 3), 1)
    bn = random_batch_norm(torch.nn.BatchNorm2d, 4)
    before = [t.clone() for t in (w, b, bn.running_mean, bn.running_var, bn.weight, bn.bias)]

    def f(v):
        return phi(activation)(bn(F.conv2d(v[None], w, b, 2, 1)))[0]

    expected = exact_scores(f, x).flatten(1).sum(1)
    got = hessian_norm_conv2d(x, w, b, 2, 1, activation=activation, batch_norm=bn, **CONST)
    assert_close(got, expected)
    after = (w, b, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    for t0, t1 in zip(before, after):
        assert torch.equal(t0, t1)


def test_linear_batch_norm_chain_matches_exact_hessian():
    x = torch.randn(6, 5, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64)
    bn = random_batch_norm(torch.nn.BatchNorm1d, 3)
    expected = exact_scores(lambda v: torch.tanh(bn(F.linear(v, w)[None]))[0], x)
    # The tuple form of the statistics, and no bias in the layer.
    stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    assert_close(hessian_norm_linear(x, w, batch_norm=stats), expected)
    assert_close(hessian_norm_linear(x, w, batch_norm=bn), expected)


def test_fold_batch_norm_is_the_module_chain():
    conv = torch.nn.Conv2d(3, 4, 3, dtype=torch.float64)
    bn = random_batch_norm(torch.nn.BatchNorm2d, 4)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w, b = fold_batch_norm(conv.weight, conv.bias, bn)
    with torch.no_grad():
        assert_close(F.conv2d(x, w, b), bn(conv(x)))


def test_reduction_and_leading_dims():
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    w = torch.randn(4, 7, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    mean = hessian_norm_linear(x, w, b, "softplus")
    total = hessian_norm_linear(x, w, b, "softplus", reduction="sum")
    assert_close(mean, hessian_norm_linear(x.reshape(6, 7), w, b, "softplus"))
    assert_close(total, 6 * mean)
    # Streaming: per-batch sums over a split data set, divided by the count, equal the mean.
    halves = sum(hessian_norm_linear(h, w, b, "softplus", reduction="sum") for h in x)
    assert_close(halves / 6, mean)
    xc, wc, bc = conv_layer(2, (5, 2, 4, 4), 3, (3, 3), 1)
    conv_total = hessian_norm_conv2d(xc, wc, bc, padding=1, reduction="sum")
    assert_close(conv_total, 5 * hessian_norm_conv2d(xc, wc, bc, padding=1))


# ---------------------------------------------------------------- smoothed: Monte Carlo


def smoothed_scores_mc(f, xs, sigma, units=lambda v: v, groups=24, per_group=8000):
    """An estimate of the mean over the samples xs of ‖∇²f_σ(x)‖_F² per output element of f
    (batched: (n, d) -> (n, m)), summed into units by `units`, f_σ(x) = E f(x + ε), ε ~ N(0, σ² I),
    independent of any closed form, and its standard error. The Hessian by Stein's identity with
    antithetic pairs,
        ∇²f_σ(x) = E[(f(x+ε) + f(x-ε) - 2 f(x)) (εεᵀ - σ² I)] / (2σ⁴),
    averaged in independent groups; ‖E Ĥ‖² by the unbiased U-statistic over pairs of groups, its
    standard error by the jackknife over groups."""
    d = xs.shape[1]
    eye = torch.eye(d, dtype=xs.dtype)
    means = []  # per group: (samples, m, d, d)
    for _ in range(groups):
        per_x = []
        for x in xs:
            eps = sigma * torch.randn(per_group, d, dtype=xs.dtype)
            df = f(x + eps) + f(x - eps) - 2 * f(x[None])
            outer = eps[:, :, None] * eps[:, None, :] - sigma ** 2 * eye
            per_x.append(torch.einsum("nm,nij->mij", df, outer) / (2 * sigma ** 4 * per_group))
        means.append(torch.stack(per_x))
    H = torch.stack(means)  # (G, samples, m, d, d)
    total = H.sum(0)
    sq = H.pow(2).sum((-1, -2))  # (G, samples, m)

    def u_stat(tot, sq_sum, g):
        return units(((tot.pow(2).sum((-1, -2)) - sq_sum) / (g * (g - 1))).mean(0))

    estimate = u_stat(total, sq.sum(0), groups)
    leave_one_out = torch.stack([u_stat(total - H[g], sq.sum(0) - sq[g], groups - 1)
                                 for g in range(groups)])
    se = ((groups - 1) / groups * (leave_one_out - leave_one_out.mean(0)).pow(2).sum(0)).sqrt()
    return estimate, se


def assert_within_mc(got, estimate, se):
    # The estimate must be precise enough to catch a wrong factor, and agree within 4.5 SE.
    assert (se < 0.08 * estimate.abs() + 1e-6).all(), (estimate, se)
    assert ((got - estimate).abs() <= 4.5 * se + 1e-9).all(), (got, estimate, se)


@pytest.mark.parametrize("activation", SMOOTHED)
def test_smoothed_linear_matches_monte_carlo(activation):
    B, I, O, sigma = 2, 3, 4, 0.5
    x = torch.randn(B, I, dtype=torch.float64)
    w = torch.randn(O, I, dtype=torch.float64)
    b = 0.5 * torch.randn(O, dtype=torch.float64)
    f = lambda v: phi(activation)(F.linear(v, w, b))  # noqa: E731
    estimate, se = smoothed_scores_mc(f, x, sigma)
    got = hessian_norm_linear(x, w, b, activation, sigma=sigma, **CONST)
    assert_within_mc(got, estimate, se)


@pytest.mark.parametrize("activation", SMOOTHED)
def test_smoothed_conv_matches_monte_carlo(activation):
    # Padding 1 on a 3x3 input: every output position has a border, s differs per position.
    sigma, shape = 0.5, (1, 1, 3, 3)
    x, w, b = conv_layer(2, shape, 2, (3, 3), 1)
    b = 0.3 * b

    def f(v):
        return phi(activation)(F.conv2d(v.reshape((-1,) + shape[1:]), w, b, 1, 1)).flatten(1)

    estimate, se = smoothed_scores_mc(f, x.flatten(1), sigma, lambda v: v.view(2, -1).sum(1),
                                      per_group=4000)
    got = hessian_norm_conv2d(x, w, b, padding=1, activation=activation, sigma=sigma, **CONST)
    assert_within_mc(got, estimate, se)


def test_identity_scores_zero_and_relu_needs_sigma():
    x = torch.randn(5, 3)
    w = torch.randn(4, 3)
    assert torch.equal(hessian_norm_linear(x, w, activation="identity", sigma=1.0),
                       torch.zeros(4))
    for act in ("relu", "leaky_relu", "identity"):
        with pytest.raises(ValueError, match="piecewise linear.*Pass sigma > 0"):
            hessian_norm_linear(x, w, activation=act)
    with pytest.raises(ValueError, match="sigma must be > 0, got -1"):
        hessian_norm_linear(x, w, activation="relu", sigma=-1.0)
    with pytest.raises(ValueError, match="has an exact Hessian: pass sigma=None"):
        hessian_norm_linear(x, w, activation="tanh", sigma=1.0)


# ---------------------------------------------------------------- fused kernels vs the reference


ALL = SMOOTH + SMOOTHED + ("identity",)


@pytest.mark.parametrize("activation", ALL)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(13, 37), (300, 77), (3, 5, 9, 37)])
def test_linear_matches_reference(activation, dtype, shape):
    # Odd sizes (vector tails); 300 x 77 splits the rows across threads.
    x = torch.randn(shape, dtype=dtype)
    w = 0.5 * torch.randn(29, shape[-1], dtype=dtype)
    b = torch.randn(29, dtype=dtype)
    sigma = sigma_for(activation)
    for reduction in ("mean", "sum"):
        got = hessian_norm_linear(x, w, b, activation, sigma=sigma, reduction=reduction, **CONST)
        expected = reference.hessian_norm_linear(x, w, b, activation, sigma,
                                                 reduction=reduction, **CONST)
        assert_close(got, expected)


@pytest.mark.parametrize("activation", ["tanh", "silu", "relu"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_matches_reference(activation, dtype, dims):
    # Positions x channels > 2048 columns: the pass splits columns into blocks.
    shape = (3, 4, 700) if dims == 1 else (3, 4, 23, 29)
    kernel = (5,) if dims == 1 else (3, 5)
    x, w, b = conv_layer(dims, shape, 6, kernel, 2, dtype)
    conv_f, ours = CONV[dims]
    sigma = sigma_for(activation)
    got = ours(x, w, b, 2, 2, 1, 2, activation, sigma=sigma, **CONST)
    expected = reference.hessian_norm_conv(x, w, b, 2, 2, 1, 2, activation, sigma, **CONST)
    assert_close(got, expected)


def test_non_contiguous_inputs():
    x = torch.randn(37, 21).t()  # (21, 37) with strides (1, 21)
    w = torch.randn(37, 13).t()
    b = torch.randn(26)[::2]
    assert_close(hessian_norm_linear(x, w, b, "gelu"),
                 reference.hessian_norm_linear(x, w, b, "gelu"))
    xc = torch.randn(2, 7, 7, 3).permute(0, 3, 1, 2)  # channels-last view
    wc = torch.randn(4, 3, 3, 3)
    assert_close(hessian_norm_conv2d(xc, wc, None, padding="same"),
                 reference.hessian_norm_conv(xc, wc, None, padding=1))
    assert_close(hessian_norm_conv2d(xc, wc, None, padding="valid"),
                 reference.hessian_norm_conv(xc, wc, None, padding=0))


def test_empty_batch_and_nan():
    w = torch.randn(4, 3)
    empty = torch.randn(0, 3)
    assert torch.isnan(hessian_norm_linear(empty, w)).all()
    assert torch.equal(hessian_norm_linear(empty, w, reduction="sum"), torch.zeros(4))
    assert torch.equal(hessian_norm_conv2d(torch.randn(0, 3, 5, 5), torch.randn(2, 3, 3, 3),
                                           reduction="sum"), torch.zeros(2))
    x = torch.randn(6, 3)
    x[2, 1] = float("nan")
    assert torch.isnan(hessian_norm_linear(x, w)).all()
    z = torch.randn(5, 4)
    z[3, 2] = float("nan")
    acc = torch.zeros(4)
    out = activation_with_hessian_norm(z, torch.rand(4) + 0.1, acc, "relu", sigma=1.0)
    assert torch.isnan(out[3, 2]) and torch.isnan(acc[2])
    assert not torch.isnan(acc[[0, 1, 3]]).any()


@settings(max_examples=20, deadline=None)
@given(dims=st.sampled_from([1, 2]), stride=st.integers(1, 3), padding=st.integers(0, 3),
       dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]), k=st.integers(1, 4),
       size=st.integers(4, 9), batch=st.integers(1, 3))
def test_conv_geometry_property(dims, stride, padding, dilation, groups, k, size, batch):
    assume(dilation * (k - 1) + 1 <= size + 2 * padding)  # at least one output position
    x, w, b = conv_layer(dims, (batch, 2 * groups) + (size,) * dims, 2 * groups, (k,) * dims,
                         groups)
    _, ours = CONV[dims]
    got = ours(x, w, b, stride, padding, dilation, groups, "softplus")
    expected = reference.hessian_norm_conv(x, w, b, stride, padding, dilation, groups, "softplus")
    assert_close(got, expected)


# ---------------------------------------------------------------- the fused activation op


@pytest.mark.parametrize("activation", ALL)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_activation_with_hessian_norm(activation, dtype):
    B, C, H, W = 7, 5, 6, 11
    z = (2 * torch.randn(W, C, B, H, dtype=dtype)).permute(2, 1, 3, 0)  # non-contiguous
    s = torch.rand(C, 1, W, dtype=dtype) + 0.1  # broadcasts over H
    sigma = sigma_for(activation)
    acc = torch.randn(C, H, W, dtype=dtype)
    start = acc.clone()
    z1 = z.detach().clone().requires_grad_()
    out = activation_with_hessian_norm(z1, s, acc, activation, sigma=sigma, **CONST)
    z2 = z.detach().clone().requires_grad_()
    expected_out, expected_term = reference.activation_with_hessian_norm(z2, s, activation, sigma,
                                                                         **CONST)
    assert_close(out, expected_out)
    assert_close(acc, start + expected_term)
    grad = torch.randn_like(out)
    (g1,) = torch.autograd.grad(out, z1, grad)
    (g2,) = torch.autograd.grad(expected_out, z2, grad)
    assert_close(g1, g2)
    # A second call accumulates.
    activation_with_hessian_norm(z, s, acc, activation, sigma=sigma, **CONST)
    assert_close(acc, start + 2 * expected_term.detach())


def test_activation_with_hessian_norm_accumulator_dtype_and_linear_s():
    z = torch.randn(50, 33)
    w = torch.randn(33, 8)
    acc = torch.zeros(33, dtype=torch.float64)
    out = activation_with_hessian_norm(z, (w * w).sum(1), acc, "tanh")
    assert out.dtype == torch.float32
    expected = reference.activation_with_hessian_norm(z.double(), (w * w).sum(1).double(),
                                                      "tanh")[1]
    assert_close(acc, expected, dtype=torch.float32)


def test_activation_with_hessian_norm_sums_to_scores():
    """The tracker's path gives the scores: accumulate over batches, sum the positions, divide."""
    x, w, b = conv_layer(2, (4, 3, 8, 8), 5, (3, 3), 1)
    z = F.conv2d(x, w, b, padding=1)
    s = F.conv2d(torch.ones_like(x[:1]), w * w, padding=1)[0]
    acc = torch.zeros_like(s)
    for half in z.split(2):
        activation_with_hessian_norm(half, s, acc, "gelu")
    assert_close(acc.flatten(1).sum(1) / 4, hessian_norm_conv2d(x, w, b, padding=1,
                                                                activation="gelu"))


@pytest.mark.parametrize("activation", ["softplus", "gelu", "leaky_relu"])
def test_activation_gradcheck(activation):
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    s = torch.rand(6, dtype=torch.float64) + 0.1
    acc = torch.zeros(6, dtype=torch.float64)
    sigma = sigma_for(activation)
    assert torch.autograd.gradcheck(
        lambda v: activation_with_hessian_norm(v, s, acc, activation, sigma=sigma, **CONST), z)


# ---------------------------------------------------------------- opcheck, compile


def test_opcheck_scores():
    x = torch.randn(6, 5)
    w = torch.randn(4, 5)
    b = torch.randn(4)
    torch.library.opcheck(ops.hessian_norm_linear.default,
                          (x, w, b, "silu", None, 0.01, 1.0, "mean"))
    torch.library.opcheck(ops.hessian_norm_linear.default,
                          (x, w, None, "leaky_relu", 0.5, 0.1, 1.0, "sum"))
    xc, wc, bc = conv_layer(2, (2, 4, 6, 6), 4, (3, 3), 2, torch.float32)
    torch.library.opcheck(ops.hessian_norm_conv.default,
                          (xc, wc, bc, [2, 1], [1], [1, 2], 2, "tanh", None, 0.01, 1.0, "mean"))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_opcheck_activation(activation):
    z = torch.randn(4, 3, 5, requires_grad=True)
    s = torch.rand(3, 1) + 0.1
    sigma = sigma_for(activation)
    torch.library.opcheck(ops.activation_with_hessian_norm_fwd.default,
                          (z, s, activation, sigma, 0.1, 1.0))
    torch.library.opcheck(ops.activation_with_hessian_norm_bwd.default,
                          (torch.randn(4, 3, 5), z.detach(), activation, 0.1, 1.0))


def test_compile_fullgraph():
    def step(x, w, acc):
        z = x @ w.t()
        out = activation_with_hessian_norm(z, (w * w).sum(1), acc, "silu")
        return out.sum()

    x = torch.randn(9, 6)
    w = torch.randn(5, 6, requires_grad=True)
    acc_eager, acc_compiled = torch.zeros(5), torch.zeros(5)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = step(x, w, acc_eager)
    got = compiled(x, w, acc_compiled)
    assert_close(got, eager)
    assert_close(acc_compiled, acc_eager)
    (g1,) = torch.autograd.grad(got, w)
    (g2,) = torch.autograd.grad(eager, w)
    assert_close(g1, g2)


# ---------------------------------------------------------------- bad input


def test_bad_inputs():
    x = torch.randn(6, 5)
    w = torch.randn(4, 5)
    with pytest.raises(ValueError,
                       match=r"activation must be one of 'tanh', .*'identity', got 'swish'"):
        hessian_norm_linear(x, w, activation="swish")
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'max'"):
        hessian_norm_linear(x, w, reduction="max")
    with pytest.raises(ValueError, match=r"input has 5 features .* expects in_features=4"):
        hessian_norm_linear(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"weight must have shape \(out_features, in_features\)"):
        hessian_norm_linear(x, torch.randn(5))
    with pytest.raises(ValueError,
                       match=r"bias must have shape \(out_features,\) = \[4\], got \[3\]"):
        hessian_norm_linear(x, w, torch.randn(3))
    with pytest.raises(TypeError, match="weight has dtype Double but input has dtype Float"):
        hessian_norm_linear(x, w.double())
    with pytest.raises(TypeError, match="input must have a floating dtype"):
        hessian_norm_linear(x.long(), w.long())
    xc = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match=r"input has 4 channels .* groups=2 expects in_channels=6"):
        hessian_norm_conv2d(xc, torch.randn(4, 3, 3, 3), groups=2)
    with pytest.raises(ValueError, match="must be divisible by groups=3"):
        hessian_norm_conv2d(torch.randn(2, 3, 6, 6), torch.randn(4, 1, 3, 3), groups=3)
    with pytest.raises(ValueError, match="groups must be >= 1, got 0"):
        hessian_norm_conv2d(xc, torch.randn(4, 4, 3, 3), groups=0)
    with pytest.raises(ValueError,
                       match=r"input must have shape \(batch, in_channels, height, width\)"):
        hessian_norm_conv2d(xc[0], torch.randn(4, 4, 3, 3))
    with pytest.raises(ValueError, match="with 1 spatial dim"):
        hessian_norm_conv1d(xc, torch.randn(4, 4, 3, 3))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        hessian_norm_conv2d(xc, torch.randn(4, 4, 3, 3), stride=0)
    with pytest.raises(ValueError, match="padding must be an int or 2 ints"):
        hessian_norm_conv2d(xc, torch.randn(4, 4, 3, 3), padding=(1, 1, 1))
    with pytest.raises(ValueError, match="pads one side more than the other"):
        hessian_norm_conv2d(xc, torch.randn(4, 4, 2, 2), padding="same")
    with pytest.raises(ValueError, match="training mode"):
        hessian_norm_conv2d(xc, torch.randn(4, 4, 3, 3), batch_norm=torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\)"):
        hessian_norm_conv2d(xc, torch.randn(4, 4, 3, 3),
                            batch_norm=torch.nn.BatchNorm2d(3).eval())
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"s \[5\] must broadcast against z.shape\[1:\] = \[4\]"):
        activation_with_hessian_norm(z, torch.rand(5), torch.zeros(4), "tanh")
    with pytest.raises(ValueError, match=r"accumulator must have shape z.shape\[1:\] = \[4\]"):
        activation_with_hessian_norm(z, torch.rand(4), torch.zeros(3, 4), "tanh")
    with pytest.raises(TypeError, match="s has dtype Double but z has dtype Float"):
        activation_with_hessian_norm(z, torch.rand(4, dtype=torch.float64), torch.zeros(4), "tanh")
    with pytest.raises(ValueError, match="z must have a batch dimension"):
        ops.activation_with_hessian_norm_fwd(torch.tensor(1.0), torch.tensor(1.0), "tanh", None,
                                             0.01, 1.0)
    with pytest.raises(ValueError, match=r"grad_output must have shape z.shape"):
        ops.activation_with_hessian_norm_bwd(torch.randn(3), z, "tanh", 0.01, 1.0)


def test_bad_inputs_under_compile():
    """The fake kernels repeat the checks: a compiled call fails with the same message."""
    @torch.compile(fullgraph=True, backend="eager")
    def scores(x, w):
        return ops.hessian_norm_linear(x, w, None, "tanh", None, 0.01, 1.0, "mean")

    with pytest.raises(Exception, match=r"input has 5 features .* expects in_features=4"):
        scores(torch.randn(6, 5), torch.randn(3, 4))


# ---------------------------------------------------------------- every dtype against float64


@pytest.mark.parametrize("device,dtype", AGAINST_CPU_FLOAT64)
@pytest.mark.parametrize("activation", ALL)
def test_every_dtype_matches_float64(device, dtype, activation):
    # The float64 CPU result from the same (rounded) inputs; low precision dtypes round z (16-bit
    # inputs run in float32: on CUDA in the kernels, on the CPU on float32 copies).
    scale = 1 if dtype in (torch.float32, torch.float64) else 4
    sigma = sigma_for(activation)
    x = torch.randn(300, 77, dtype=dtype)
    w = (0.3 * torch.randn(29, 77)).to(dtype)
    b = torch.randn(29).to(dtype)
    got = hessian_norm_linear(x.to(device), w.to(device), b.to(device), activation, sigma=sigma,
                              **CONST)
    expected = hessian_norm_linear(x.double(), w.double(), b.double(), activation, sigma=sigma,
                                   **CONST)
    assert_close(got.cpu().double(), expected, dtype=dtype, scale=scale)
    xc, wc, bc = conv_layer(2, (3, 4, 23, 29), 6, (3, 5), 2, dtype)
    got = hessian_norm_conv2d(xc.to(device), wc.to(device), bc.to(device), 2, 2, 1, 2,
                              activation, sigma=sigma, **CONST)
    expected = hessian_norm_conv2d(xc.double(), wc.double(), bc.double(), 2, 2, 1, 2, activation,
                                   sigma=sigma, **CONST)
    assert_close(got.cpu().double(), expected, dtype=dtype, scale=scale)
    z = (2 * torch.randn(70, 5, 33)).to(dtype)
    s = (torch.rand(5, 1) + 0.1).to(dtype)
    acc = torch.zeros(5, 33, device=device, dtype=torch.promote_types(dtype, torch.float32))
    zg = z.to(device).requires_grad_()
    out = activation_with_hessian_norm(zg, s.to(device), acc, activation, sigma=sigma, **CONST)
    expected_out, expected_term = reference.activation_with_hessian_norm(
        z.double().requires_grad_(), s.double(), activation, sigma, **CONST)
    assert_close(out.cpu().double(), expected_out.detach(), dtype=dtype)
    assert_close(acc.cpu().double(), expected_term.detach(), dtype=dtype, scale=scale)
    grad = torch.randn(z.shape).to(dtype)
    (g,) = torch.autograd.grad(out, zg, grad.to(device))
    z64 = z.double().requires_grad_()
    (g64,) = torch.autograd.grad(reference.activation(activation, z64, **CONST), z64,
                                 grad.double())
    assert_close(g.cpu().double(), g64, dtype=dtype)


@pytest.mark.cuda
def test_cuda_opcheck_and_empty():
    z = torch.randn(4, 3, 5, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.activation_with_hessian_norm_fwd.default,
                          (z, torch.rand(3, 1, device="cuda"), "tanh", None, 0.01, 1.0))
    w = torch.randn(4, 3, device="cuda")
    assert torch.isnan(hessian_norm_linear(torch.randn(0, 3, device="cuda"), w)).all()
