"""kd_loss and mapping_distance (MATH.md §3) against independent references (reference.py, and
torch.nn.functional where it has the same quantity), gradients, compile, bad input; Distiller on
scikit-learn's digits and under DistributedDataParallel."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mapopt_native import reference
from mapopt_native.distill import Distiller, accuracy, kd_loss, mapping_distance

from conftest import AGAINST_CPU_FLOAT64, assert_close

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
from distill_digits import digits_accuracies, mlp  # noqa: E402

ops = torch.ops.mapopt_native


def logits(N, C, dtype=torch.float64, device="cpu", scale=3.0):
    return (scale * torch.randn(N, C, dtype=dtype)).to(device)


def targets(N, C, ignored=0, device="cpu"):
    y = torch.randint(0, C, (N,))
    y[torch.randperm(N)[:ignored]] = -100
    return y.to(device)


def loss_and_grad(fn, s, t, grad_out):
    """fn(s, t) and the gradient of sum(fn * grad_out) w.r.t. s; t is checked to get none."""
    s = s.detach().requires_grad_()  # views: strides (non-contiguous inputs) are kept
    t = t.detach().requires_grad_()
    out = fn(s, t)
    (out * grad_out).sum().backward()
    assert t.grad is None or not t.grad.any()
    return out.detach(), s.grad


@pytest.mark.parametrize("distance,temperature", [("l2", 1.0), ("kl", 1.0), ("kl", 0.5),
                                                  ("kl", 4.0)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_loss_matches_reference(distance, temperature, alpha, reduction, dtype):
    N, C = 13, 37  # odd C: vector body and scalar tail
    s, t = logits(N, C, dtype), logits(N, C, dtype)
    y = targets(N, C, ignored=3)
    grad_out = torch.randn(N if reduction == "none" else (), dtype=dtype)
    kw = dict(distance=distance, temperature=temperature, reduction=reduction)
    ours = loss_and_grad(lambda a, b: kd_loss(a, b, y, alpha, **kw), s, t, grad_out)
    ref = loss_and_grad(lambda a, b: reference.kd_loss(a, b, y, alpha, **kw), s, t, grad_out)
    assert_close(ours[0], ref[0], scale=10)
    assert_close(ours[1], ref[1])
    if reduction == "none":  # ignored rows: exactly zero loss and gradient
        ignored = y == -100
        assert (ours[0][ignored] == 0).all() and (ours[1][ignored] == 0).all()


@settings(max_examples=40, deadline=None)
@given(N=st.integers(0, 9), C=st.integers(1, 70), distance=st.sampled_from(["l2", "kl"]),
       temperature=st.floats(0.1, 10.0), alpha=st.floats(0.0, 1.0),
       with_target=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kd_loss_property(N, C, distance, temperature, alpha, with_target, seed):
    g = torch.Generator().manual_seed(seed)
    s = 4 * torch.randn(N, C, generator=g, dtype=torch.float64)
    t = 4 * torch.randn(N, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g) if with_target else None
    if y is not None and N:
        y[0] = -100
    kw = dict(distance=distance, temperature=temperature, reduction="none")
    grad_out = torch.randn(N, generator=g, dtype=torch.float64)
    ours = loss_and_grad(lambda a, b: kd_loss(a, b, y, alpha, **kw), s, t, grad_out)
    ref = loss_and_grad(lambda a, b: reference.kd_loss(a, b, y, alpha, **kw), s, t, grad_out)
    assert_close(ours[0], ref[0], scale=100)
    assert_close(ours[1], ref[1], scale=100)


def test_kd_loss_matches_torch_functional():
    """Against F.cross_entropy / F.kl_div / F.mse_loss, not the reference: the docstring's
    l2-mean = C × mse_loss, and KL = T² kl_div(batchmean)."""
    N, C, T, alpha = 32, 50, 2.0, 0.3
    s, t, y = logits(N, C), logits(N, C), targets(N, C)
    assert_close(kd_loss(s, t, y, 0.0), F.cross_entropy(s, y))
    assert_close(kd_loss(s, t, None, distance="l2"), C * F.mse_loss(s, t))
    kl = T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                          reduction="batchmean")
    assert_close(kd_loss(s, t, None, distance="kl", temperature=T), kl)
    expected = (1 - alpha) * F.cross_entropy(s, y) + alpha * kl
    assert_close(kd_loss(s, t, y, alpha, distance="kl", temperature=T), expected)


@pytest.mark.parametrize("distance", ["l2", "kl"])
@pytest.mark.parametrize("C", [1, 2, 16, 17, 1000, 3001])
def test_kd_loss_shapes_and_stability(distance, C):
    """Class counts around the vector width; logits offset by 1e4 (a naive softmax overflows)."""
    N = 9
    s = logits(N, C, torch.float32) + 1e4
    t = logits(N, C, torch.float32) + 1e4
    y = targets(N, C, ignored=2)
    ours = loss_and_grad(lambda a, b: kd_loss(a, b, y, 0.5, distance=distance, temperature=2.0),
                         s, t, torch.tensor(1.0))
    ref = loss_and_grad(lambda a, b: reference.kd_loss(a.double(), b.double(), y, 0.5,
                                                       distance=distance, temperature=2.0),
                        s, t, torch.tensor(1.0))
    assert torch.isfinite(ours[0]).all()
    # float32 logits of magnitude 1e4 carry an absolute rounding error of ~1e-3.
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-4, atol=2e-3 * C ** 0.5)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("distance", ["l2", "kl"])
def test_kd_loss_target_none_is_the_distance(distance):
    N, C = 11, 23
    s, t = logits(N, C), logits(N, C)
    for reduction in ("mean", "sum", "none"):
        grad_out = torch.randn(N if reduction == "none" else ())
        kw = dict(distance=distance, temperature=3.0, reduction=reduction)
        ours = loss_and_grad(lambda a, b: kd_loss(a, b, None, 0.25, **kw), s, t, grad_out)
        ref = loss_and_grad(lambda a, b: reference.kd_loss(a, b, None, **kw), s, t, grad_out)
        assert_close(ours[0], ref[0])
        assert_close(ours[1], ref[1])


@pytest.mark.parametrize("distance", ["l2", "kl"])
def test_kd_loss_sequences_and_noncontiguous(distance):
    """(B, T, C) logits with (B, T) targets; transposed (non-contiguous) inputs; the inputs are
    left unmodified."""
    B, T, C = 3, 5, 29
    s = logits(T, B * C).reshape(T, B, C).transpose(0, 1)  # (B, T, C), not contiguous
    t = logits(B, C, scale=2.0).unsqueeze(1).expand(B, T, C)  # stride 0 over T
    y = targets(B * T, C, ignored=4).reshape(B, T)
    assert not s.is_contiguous() and not t.is_contiguous()
    copies = (s.clone(), t.clone(), y.clone())
    for reduction in ("mean", "none"):
        grad_out = torch.randn((B, T) if reduction == "none" else ())
        kw = dict(distance=distance, temperature=1.5, reduction=reduction)
        ours = loss_and_grad(lambda a, b: kd_loss(a, b, y, 0.7, **kw), s, t, grad_out)
        ref = loss_and_grad(lambda a, b: reference.kd_loss(a, b, y, 0.7, **kw), s, t, grad_out)
        assert ours[0].shape == ref[0].shape
        assert_close(ours[0], ref[0])
        assert_close(ours[1], ref[1])
    for before, after in zip(copies, (s, t, y)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("distance", ["l2", "kl"])
@pytest.mark.parametrize("column", [3, 37])  # in the vector body, in the scalar tail
def test_kd_loss_nan_propagates_to_its_row_only(distance, column):
    for which in ("student", "teacher"):
        s, t, y = logits(3, 40, torch.float32), logits(3, 40, torch.float32), targets(3, 40)
        (s if which == "student" else t)[1, column] = float("nan")
        rows = kd_loss(s, t, y, 0.5, distance=distance, temperature=2.0, reduction="none")
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_kd_loss_all_ignored_and_empty():
    s, t = logits(4, 7), logits(4, 7)
    y = torch.full((4,), -100)
    assert torch.isnan(kd_loss(s, t, y))  # as F.cross_entropy: 0 / 0
    assert kd_loss(s, t, y, reduction="sum") == 0
    empty = torch.empty(0, 7, dtype=torch.float64)
    assert kd_loss(empty, empty, torch.empty(0, dtype=torch.long), reduction="none").shape == (0,)


def test_kd_loss_forward_keeps_no_logits_size_buffer():
    """The forward returns per-row losses and 3 statistics per row, nothing of logits size."""
    s, t, y = logits(6, 10), logits(6, 10), targets(6, 10)
    loss, stats = ops.kd_loss_fwd(s, t, y, 0.5, "kl", 2.0, -100)
    assert loss.shape == (6,) and stats.shape == (6, 3)
    s.requires_grad_()
    with torch.no_grad():
        assert not kd_loss(s, t, y, distance="kl").requires_grad


def test_kd_loss_retained_graph_gives_the_same_gradient_twice():
    s, t, y = logits(4, 6).requires_grad_(), logits(4, 6), targets(4, 6)
    loss = kd_loss(s, t, y, distance="kl", temperature=3.0, reduction="none")
    g = torch.randn(4, dtype=torch.float64)
    first = torch.autograd.grad((loss * g).sum(), s, retain_graph=True)[0]
    second = torch.autograd.grad((loss * g).sum(), s)[0]
    assert torch.equal(first, second)


def test_kd_loss_teacher_gets_no_gradient():
    s = logits(5, 8).requires_grad_()
    t = logits(5, 8).requires_grad_()
    kd_loss(s, t, targets(5, 8), distance="kl").backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("distance", ["l2", "kl"])
@pytest.mark.parametrize("with_target", [True, False])
def test_kd_loss_gradcheck(distance, with_target):
    s, t = logits(5, 9, scale=1.0), logits(5, 9, scale=1.0)
    y = targets(5, 9, ignored=1) if with_target else None
    for reduction in ("mean", "none"):
        fn = lambda a: kd_loss(a, t, y, 0.4, distance=distance, temperature=1.7,  # noqa: E731
                               reduction=reduction)
        assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(),))


def test_kd_loss_opcheck():
    s, t, y = logits(6, 11, torch.float32), logits(6, 11, torch.float32), targets(6, 11, 1)
    for distance in ("l2", "kl"):
        for target in (y, None):
            args = (t, target, 0.5, distance, 2.0, -100)
            torch.library.opcheck(ops.kd_loss_fwd, (s.clone().requires_grad_(), *args))
            _, stats = ops.kd_loss_fwd(s, *args)
            torch.library.opcheck(ops.kd_loss_bwd, (torch.randn(6), s, t, target, stats,
                                                    *args[2:]))
            c = torch.rand(())
            torch.library.opcheck(ops.kd_loss_total, (s.clone().requires_grad_(), *args, c))
            torch.library.opcheck(ops.kd_loss_fwd_grad, (s, *args, c))


@pytest.mark.parametrize("distance", ["l2", "kl"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_target", [True, False])
def test_kd_loss_gradient_paths(distance, reduction, with_target):
    """The reduced loss writes its gradient in the forward call: handed over as is for an
    incoming gradient of exactly 1, scaled otherwise, recomputed on a second backward, not
    written at all without autograd."""
    N, C = 9, 37
    s, t = logits(N, C), logits(N, C)
    y = targets(N, C, ignored=2) if with_target else None
    kw = dict(distance=distance, temperature=1.5, reduction=reduction)
    s_ref = s.clone().requires_grad_()
    expected = reference.kd_loss(s_ref, t, y, 0.3, **kw)
    (g_ref,) = torch.autograd.grad(expected, s_ref)
    a = s.clone().requires_grad_()
    out = kd_loss(a, t, y, 0.3, **kw)
    assert_close(out, expected)
    out.backward(retain_graph=True)  # exactly 1
    assert_close(a.grad, g_ref)
    out.backward(torch.tensor(2.5, dtype=out.dtype))  # second backward, from saved statistics
    assert_close(a.grad, 3.5 * g_ref)
    b = s.clone().requires_grad_()
    (0.25 * kd_loss(b, t, y, 0.3, **kw)).backward()
    assert_close(b.grad, 0.25 * g_ref)
    with torch.no_grad():
        assert_close(kd_loss(b, t, y, 0.3, **kw), expected.detach())


def test_reduced_losses_under_create_graph_vmap_and_checkpoint():
    """The fused gradient path gives way where a stashed buffer would be wrong or wasteful: an
    incoming gradient inside a graph (create_graph, a learnable weight of exactly 1), batched
    incoming gradients (vmap), saved-tensor hooks (activation checkpointing)."""
    N, C = 6, 9
    s, t, y = logits(N, C), logits(N, C), targets(N, C, ignored=1)
    pairs_t = [torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)]
    pairs_s = [torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)]
    losses = {
        "kd": (lambda a: kd_loss(a[0], t, y, 0.3, distance="kl", reduction="sum"),
               lambda a: reference.kd_loss(a[0], t, y, 0.3, distance="kl", reduction="sum"),
               [s]),
        "md": (lambda a: mapping_distance(a, pairs_t), lambda a: reference.mapping_distance(
            a, pairs_t), pairs_s),
    }
    for ours, ref, inputs in losses.values():
        def d_weight(fn):  # d/dw of <∂(w·L)/∂x, v> + Σ x·w at w = 1
            w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
            xs = [x.clone().requires_grad_() for x in inputs]
            gs = torch.autograd.grad(w * fn(xs), xs, create_graph=True)
            total = sum((g * torch.ones_like(g)).sum() + (x * w).sum() for g, x in zip(gs, xs))
            return torch.autograd.grad(total, w)[0]
        assert_close(d_weight(ours), d_weight(ref))

        xs = [x.clone().requires_grad_() for x in inputs]
        scales = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
        batched = torch.autograd.grad(ours(xs), xs, grad_outputs=scales, is_grads_batched=True)
        xr = [x.clone().requires_grad_() for x in inputs]
        single = torch.autograd.grad(ref(xr), xr)
        for b, r in zip(batched, single):
            assert_close(b, scales.view(-1, *[1] * r.dim()) * r)

        xs = [x.clone().requires_grad_() for x in inputs]
        out = torch.utils.checkpoint.checkpoint(lambda *a: ours(list(a)), *xs,
                                                use_reentrant=False)
        out.backward()
        for x, r in zip(xs, single):
            assert_close(x.grad, r)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mapping_distance_learnable_weights(reduction):
    students, teachers = mixed_pairs(3)
    grads = []
    for fn in (lambda s, w: mapping_distance(s, teachers, weights=w, reduction=reduction),
               lambda s, w: reference.mapping_distance(s, teachers, w, reduction)):
        ss = [s.clone().requires_grad_() for s in students]
        w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64, requires_grad=True)
        grads.append(torch.autograd.grad(3.0 * fn(ss, w), [w, *ss]))
    for a, b in zip(*grads):
        assert_close(a, b)


def test_kd_loss_bad_coefficient():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises((ValueError, RuntimeError), match=r"coefficient must be 0-dim"):
        ops.kd_loss_total(s, t, None, 0.5, "l2", 1.0, -100, torch.ones(4))
    with pytest.raises((TypeError, RuntimeError), match=r"coefficient must have dtype"):
        ops.kd_loss_fwd_grad(s, t, None, 0.5, "l2", 1.0, -100, torch.ones((), dtype=torch.float64))


def test_kd_loss_compiled_training_step():
    torch._dynamo.reset()
    N, I, C = 16, 12, 10
    model = nn.Linear(I, C).double()
    twin = nn.Linear(I, C).double()
    twin.load_state_dict(model.state_dict())
    x, t, y = torch.randn(N, I, dtype=torch.float64), logits(N, C), targets(N, C, ignored=2)

    def step(m):
        loss = kd_loss(m(x), t, y, 0.6, distance="kl", temperature=2.0)
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step, fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # backward() inside the graph
        got = compiled(model)
    expected = reference.kd_loss(twin(x), t, y, 0.6, distance="kl", temperature=2.0)
    expected.backward()
    assert_close(got, expected.detach())
    assert_close(model.weight.grad, twin.weight.grad)
    assert_close(model.bias.grad, twin.bias.grad)


# ---------------------------------------------------------------- mapping_distance


def mixed_pairs(P, dtype=torch.float64):
    shapes = [(2, 3), (4, 5, 6), (3, 1, 2, 7), (5,), (1, 40000), (6, 2, 3)]
    students, teachers = [], []
    for j in range(P):
        shape = shapes[j % len(shapes)]
        shape = (shape[0] + j % 3,) + shape[1:]
        students.append(torch.randn(shape, dtype=dtype))
        teachers.append(torch.randn(shape, dtype=dtype))
    return students, teachers


@pytest.mark.parametrize("P", [1, 2, 50])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mapping_distance_matches_loop(P, reduction, weighted):
    students, teachers = mixed_pairs(P)
    weights = torch.rand(P).tolist() if weighted else None
    grad_out = torch.randn(P if reduction == "none" else (), dtype=torch.float64)

    def run(fn):
        ss = [s.clone().requires_grad_() for s in students]
        ts = [t.clone().requires_grad_() for t in teachers]
        out = fn(ss, ts)
        (out * grad_out).sum().backward()
        assert all(t.grad is None for t in ts)
        return out.detach(), [s.grad for s in ss]

    ours = run(lambda s, t: mapping_distance(s, t, weights=weights, reduction=reduction))
    ref = run(lambda s, t: reference.mapping_distance(s, t, weights, reduction))
    assert_close(ours[0], ref[0])
    for a, b in zip(ours[1], ref[1]):
        assert_close(a, b)


def test_mapping_distance_float32_noncontiguous_and_empty():
    a = torch.randn(7, 9).t()  # (9, 7), not contiguous
    b = torch.randn(9, 7)
    e = torch.empty(0, 4)
    c, d = torch.randn(3, 33), torch.randn(3, 33)
    out = mapping_distance([a, e, c], [b, e.clone(), d], reduction="none")
    expected = torch.stack([(a - b).pow(2).sum() / 9, torch.tensor(0.0), (c - d).pow(2).sum() / 3])
    assert_close(out, expected)


def test_mapping_distance_gradcheck_and_opcheck():
    students, teachers = mixed_pairs(3)
    students = [s.requires_grad_() for s in students]
    assert torch.autograd.gradcheck(
        lambda *ss: mapping_distance(list(ss), teachers, weights=[0.5, 2.0, 1.0],
                                     reduction="none"), tuple(students))
    torch.library.opcheck(ops.mapping_distance_fwd, ([s.float() for s in students],
                                                     [t.float() for t in teachers]))
    torch.library.opcheck(ops.mapping_distance_bwd, (torch.randn(3), [s.detach().float() for s
                                                                      in students],
                                                     [t.float() for t in teachers]))
    pairs = ([s.float() for s in students], [t.float() for t in teachers], torch.rand(3))
    torch.library.opcheck(ops.mapping_distance_total, pairs)
    torch.library.opcheck(ops.mapping_distance_fwd_grad, ([s.detach() for s in pairs[0]],
                                                          *pairs[1:]))


def test_mapping_distance_compiled():
    torch._dynamo.reset()
    students, teachers = mixed_pairs(4)
    fn = torch.compile(lambda s, t: mapping_distance(s, t, weights=[1.0, 0.5, 2.0, 0.1],
                                                     reduction="sum"), fullgraph=True)
    expected = reference.mapping_distance(students, teachers, [1.0, 0.5, 2.0, 0.1], "sum")
    assert_close(fn(students, teachers), expected)


def test_mapping_distance_compiled_training_step():
    torch._dynamo.reset()
    students, teachers = mixed_pairs(3)
    ours = [s.clone().requires_grad_() for s in students]
    ref = [s.clone().requires_grad_() for s in students]

    def step(ss):
        loss = 3.0 * mapping_distance(ss, teachers, weights=[1.0, 0.5, 2.0])
        loss.backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):  # backward() inside the graph
        got = torch.compile(step, fullgraph=True)(ours)
    expected = 3.0 * reference.mapping_distance(ref, teachers, [1.0, 0.5, 2.0], "mean")
    expected.backward()
    assert_close(got, expected.detach())
    for a, b in zip(ours, ref):
        assert_close(a.grad, b.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mapping_distance_gradient_paths(reduction):
    """The reduced op writes its gradient in the forward pass: handed over as is for an incoming
    gradient of exactly 1, scaled otherwise, recomputed on a second backward, not written at all
    without autograd."""
    students, teachers = mixed_pairs(5)
    weights = torch.rand(5).tolist()
    ref = [s.clone().requires_grad_() for s in students]
    expected = reference.mapping_distance(ref, teachers, weights, reduction)
    (g_ref,) = [torch.autograd.grad(expected, ref)]
    ss = [s.clone().requires_grad_() for s in students]
    out = mapping_distance(ss, teachers, weights=weights, reduction=reduction)
    assert_close(out, expected)
    out.backward(retain_graph=True)  # exactly 1
    first = [s.grad.clone() for s in ss]
    out.backward(torch.tensor(2.5, dtype=out.dtype))  # second backward, from the saved pairs
    for a, b, g in zip(first, ss, g_ref):
        assert_close(a, g)
        assert_close(b.grad, 3.5 * g)
    ss = [s.clone().requires_grad_() for s in students]
    (0.25 * mapping_distance(ss, teachers, weights=weights, reduction=reduction)).backward()
    for a, g in zip(ss, g_ref):
        assert_close(a.grad, 0.25 * g)
    with torch.no_grad():
        assert_close(mapping_distance(ss, teachers, weights=weights, reduction=reduction),
                     expected.detach())


# ---------------------------------------------------------------- bad input


BAD_KD = [
    (dict(teacher=torch.randn(4, 6)), r"teacher_logits must have the shape .*\[4, 5\].*\[4, 6\]"),
    (dict(target=torch.tensor([0, 1, 5, 2])), r"target\[2\] = 5 is not a class index in \[0, 5\)"),
    (dict(target=torch.tensor([0, 1, -1, 2])), r"target\[2\] = -1"),
    (dict(target=torch.tensor([0, 1, 2])), r"target must have shape \[4\]"),
    (dict(target=torch.tensor([0.0, 1, 2, 3])), r"target must hold int64 class indices"),
    (dict(teacher=torch.randn(4, 5, dtype=torch.float64)),
     r"teacher logits has dtype (torch.float64|Double) but student logits has dtype "
     r"(torch.float32|Float)"),
    (dict(distance="cosine"), r"distance must be 'l2' or 'kl', got 'cosine'"),
    (dict(reduction="avg"), r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    (dict(temperature=0.0), r"temperature must be positive and finite, got 0"),
    (dict(temperature=-2.0), r"temperature must be positive and finite, got -2"),
    (dict(alpha=1.5), r"alpha must be in \[0, 1\], got 1.5"),
    (dict(alpha=-0.1), r"alpha must be in \[0, 1\], got -0.1"),
    (dict(student=torch.randn(4, 5).int(), teacher=torch.randn(4, 5).int()),
     r"student logits must have a floating dtype"),
    (dict(student=torch.randn(4, 0), teacher=torch.randn(4, 0)), r"C >= 1"),
]


@pytest.mark.parametrize("change,match", BAD_KD)
def test_kd_loss_bad_input_raises(change, match):
    args = dict(student=torch.randn(4, 5), teacher=torch.randn(4, 5),
                target=torch.tensor([0, 1, 2, 3]), alpha=0.5, distance="kl", temperature=1.0,
                reduction="mean")
    args.update(change)
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        kd_loss(args.pop("student"), args.pop("teacher"), args.pop("target"), args.pop("alpha"),
                **args)


def test_kd_ops_check_their_input_too():
    """The ops themselves (not only the Python wrapper) reject bad shapes and targets."""
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"target must have shape \(N,\) = \(4,\)"):
        ops.kd_loss_fwd(s, t, torch.zeros(3, dtype=torch.long), 0.5, "l2", 1.0, -100)
    with pytest.raises(ValueError, match=r"teacher logits must have the student's shape"):
        ops.kd_loss_fwd(s, torch.randn(4, 6), None, 0.5, "l2", 1.0, -100)
    with pytest.raises(ValueError, match=r"target\[0\] = 9"):
        ops.kd_loss_fwd(s, t, torch.full((4,), 9), 0.5, "l2", 1.0, -100)
    _, stats = ops.kd_loss_fwd(s, t, None, 0.5, "l2", 1.0, -100)
    with pytest.raises(ValueError, match=r"grad_loss must have shape \(N,\) = \(4,\)"):
        ops.kd_loss_bwd(torch.ones(5), s, t, None, stats, 0.5, "l2", 1.0, -100)
    with pytest.raises(ValueError, match=r"row_stats must have shape \(N, 3\)"):
        ops.kd_loss_bwd(torch.ones(4), s, t, None, stats[:2], 0.5, "l2", 1.0, -100)


BAD_PAIRS = [
    (lambda: ([torch.randn(3, 4)], [torch.randn(3, 5)]),
     r"teachers\[0\] must have the shape of students\[0\] = \[3, 4\], got \[3, 5\]"),
    (lambda: ([torch.randn(3, 4), torch.randn(2)], [torch.randn(3, 4)]),
     r"students and teachers must have one length, got 2 and 1"),
    (lambda: ([], []), r"students must hold at least one tensor"),
    (lambda: ([torch.randn(3), torch.randn(2).double()], [torch.randn(3), torch.randn(2).double()]),
     r"students\[1\] has dtype (torch.float64|Double) but students\[0\] has dtype "
     r"(torch.float32|Float)"),
    (lambda: ([torch.tensor(1.0)], [torch.tensor(2.0)]), r"students\[0\] must have a batch dim"),
]


@pytest.mark.parametrize("make,match", BAD_PAIRS)
def test_mapping_distance_bad_input_raises(make, match):
    students, teachers = make()
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        mapping_distance(students, teachers)
    if students:  # an empty list never reaches a kernel
        with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
            ops.mapping_distance_fwd(students, teachers)


def test_mapping_distance_bad_weights():
    with pytest.raises((ValueError, RuntimeError), match=r"weights must hold one weight per pair"):
        mapping_distance([torch.randn(2, 3)] * 2, [torch.randn(2, 3)] * 2, weights=[1.0])
    pairs = ([torch.randn(2, 3)] * 2, [torch.randn(2, 3)] * 2)
    with pytest.raises((ValueError, RuntimeError), match=r"coefficients must have shape \(2,\)"):
        ops.mapping_distance_total(*pairs, torch.ones(3))
    with pytest.raises((TypeError, RuntimeError), match=r"coefficients must have dtype (torch\.)?"
                       r"[Ff]loat.*got (torch\.float64|Double)"):
        ops.mapping_distance_fwd_grad(*pairs, torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------- every dtype against float64

@pytest.mark.parametrize("device,dtype", AGAINST_CPU_FLOAT64)
@pytest.mark.parametrize("distance", ["l2", "kl"])
@pytest.mark.parametrize("C", [7, 1000, 32001])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_kd_loss_every_dtype_matches_float64(device, dtype, distance, C, reduction):
    N = 33
    s, t, y = logits(N, C, torch.float64), logits(N, C, torch.float64), targets(N, C, ignored=3)
    s, t = s.to(dtype), t.to(dtype)  # the same rounded values in both runs
    kw = dict(distance=distance, temperature=2.0, reduction=reduction)
    grad_out = torch.randn(N if reduction == "none" else (), dtype=torch.float64)
    ref = loss_and_grad(lambda a, b: kd_loss(a, b, y, 0.4, **kw), s.double(), t.double(),
                        grad_out)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ours = loss_and_grad(lambda a, b: kd_loss(a, b, y.to(device), 0.4, **kw), s.to(device),
                         t.to(device), grad_out.to(device, acc))
    # Losses in the accumulation dtype (a 16-bit l2 loss over 32001 classes passes 65504).
    assert ours[0].dtype == acc and ours[1].dtype == dtype
    assert_close(ours[0].cpu().double(), ref[0], dtype=acc, scale=10)
    assert_close(ours[1].cpu().double(), ref[1], dtype=dtype, scale=10)


@pytest.mark.parametrize("device,dtype", AGAINST_CPU_FLOAT64)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_mapping_distance_every_dtype_matches_float64(device, dtype, reduction):
    students, teachers = mixed_pairs(50, torch.float64)
    students = [s.to(dtype) for s in students]
    teachers = [t.to(dtype) for t in teachers]
    grad_out = torch.randn(50 if reduction == "none" else (), dtype=torch.float64)

    def run(ss, ts, g):
        ss = [s.clone().requires_grad_() for s in ss]
        out = mapping_distance(ss, ts, reduction=reduction)
        (out * g).sum().backward()
        return out.detach(), [s.grad for s in ss]

    ref = run([s.double() for s in students], [t.double() for t in teachers], grad_out)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ours = run([s.to(device) for s in students], [t.to(device) for t in teachers],
               grad_out.to(device, acc))
    # Distances in the accumulation dtype: the (1, 40000) pairs' pass float16's 65504.
    assert ours[0].dtype == acc and ours[1][0].dtype == dtype
    assert_close(ours[0].cpu().double(), ref[0], dtype=acc, scale=10)
    for a, b in zip(ours[1], ref[1]):
        assert_close(a.cpu().double(), b, dtype=dtype, scale=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [0.731, 65536.0])
def test_reduced_16bit_cpu_gradients_are_rounded_once(dtype, scale):
    """kd_loss and mapping_distance with a reduction, 16-bit on the CPU, backward from a gradient
    `scale`: the student's gradient is the float64 reference's rounded to the dtype once (up to
    float32 inside moving a rare value across a rounding boundary). A gradient rounded in the
    forward and scaled in the backward is rounded twice (at 0.731), and float16 gradients below
    its normal range (about 1e-5 here) lose their low bits before AMP's loss scale (65536) could
    keep them."""
    N, C = 64, 1000
    s, t, y = logits(N, C).to(dtype), logits(N, C).to(dtype), targets(N, C, ignored=3)
    # Small independent pairs: differences of arbitrary bits, and float16 gradients of
    # 2 (s - t) / (B P) below its normal range at B = 64.
    students, teachers = ([(1e-3 * torch.randn(B, 300, dtype=torch.float64)).to(dtype)
                           for B in (64, 16)] for _ in range(2))
    kw = dict(distance="kl", temperature=2.0)
    cases = [(lambda ss: kd_loss(ss[0], t, y, 0.4, **kw),
              lambda ss: reference.kd_loss(ss[0], t.double(), y, 0.4, **kw), [s]),
             (lambda ss: mapping_distance(ss, teachers),
              lambda ss: reference.mapping_distance(ss, [x.double() for x in teachers]),
              students)]

    def grads(fn, inputs, out_dtype):
        inputs = [x.detach().clone().requires_grad_() for x in inputs]
        fn(inputs).backward(torch.tensor(scale, dtype=out_dtype))
        return [x.grad for x in inputs]

    info = torch.finfo(dtype)
    for ours_fn, ref_fn, inputs in cases:
        ours = grads(ours_fn, inputs, torch.float32)
        ref = grads(ref_fn, [x.double() for x in inputs], torch.float64)
        for a, r in zip(ours, ref):
            once = r.to(dtype)
            assert a.dtype == dtype
            assert (a != once).double().mean() < 0.01
            # Within one ulp, where float32's precision of the largest terms allows: an element
            # whose terms cancel (two nearly equal softmax values) is known only to that.
            one_ulp = info.eps * once.double().abs() + info.smallest_normal * info.eps
            float32_part = 16 * torch.finfo(torch.float32).eps * r.abs().max()
            assert ((a.double() - once.double()).abs() <= one_ulp + float32_part).all()


# ---------------------------------------------------------------- Distiller


def test_distiller_loss_with_feature_adapters():
    """The Distiller's loss is kd_loss plus the weighted feature distances, with a Linear adapter
    for a width mismatch (created on the first batch) and a 1x1 conv for a (B, C, H, W) one; the
    adapters receive gradients and fit() trains them."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, 5))
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 16, 6), nn.ReLU(), nn.Linear(6, 5))
    d = Distiller(teacher, student, alpha=0.5, distance="kl", temperature=2.0,
                  features={"1": "1", "4": "4"}, feature_weights=[0.3, 2.0])
    x, y = torch.randn(10, 3, 4, 4), torch.randint(0, 5, (10,))
    loss, out = d(x, y)
    assert isinstance(d.adapters["1"], nn.Conv2d) and isinstance(d.adapters["4"], nn.Linear)
    with torch.no_grad():
        t_out, s_out = teacher(x), student(x)
        f_t = [teacher[1](teacher[0](x)), teacher[4](teacher[3](teacher[2](teacher[1](
            teacher[0](x)))))]
        f_s = [student[1](student[0](x)), student[4](student[3](student[2](student[1](
            student[0](x)))))]
        f_s = [d.adapters["1"](f_s[0]), d.adapters["4"](f_s[1])]
        expected = reference.kd_loss(s_out, t_out, y, 0.5, "kl", 2.0) + sum(
            w * (a - b).pow(2).sum() / a.shape[0] for w, a, b in zip([0.3, 2.0], f_s, f_t))
    assert_close(loss.detach(), expected)
    assert_close(out.detach(), s_out)
    loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in d.adapters.parameters())
    assert all(p.grad is None for p in teacher.parameters())

    before = [p.detach().clone() for p in d.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    history = d.fit([(x, y)] * 3, epochs=2, lr=1e-2, eval_loader=[(x, y)], progress=False)
    assert len(history["loss"]) == 2 and len(history["accuracy"]) == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, d.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))


def test_distiller_adds_lazy_adapters_to_a_given_optimizer():
    torch.manual_seed(0)
    teacher, student = mlp(8, 16, 3), mlp(8, 4, 3)
    d = Distiller(teacher, student, features={"1": "1"})
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    d.fit([(x, y)], epochs=1, optimizer=opt, progress=False)
    adapter = list(d.adapters.parameters())
    assert len(adapter) == 2
    assert {id(p) for g in opt.param_groups for p in g["params"]} >= {id(p) for p in adapter}


def test_distiller_bad_features():
    teacher, student = mlp(8, 16, 3), mlp(8, 4, 3)
    with pytest.raises(ValueError, match=r"student has no submodule named 'nope'"):
        Distiller(teacher, student, features={"nope": "1"})
    d = Distiller(teacher, student, features={"1": "1"}, adapters=None)
    with pytest.raises(ValueError, match=r"student shape \[2, 4\] differs from the teacher's"):
        d(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))


@pytest.mark.cuda
def test_distiller_fit_with_amp_on_cuda():
    torch.manual_seed(0)
    teacher, student = mlp(8, 32, 4).cuda(), mlp(8, 6, 4).cuda()
    d = Distiller(teacher, student, distance="kl", temperature=2.0, features={"1": "1"})
    x, y = torch.randn(16, 8, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
    before = [p.detach().clone() for p in student.parameters()]
    history = d.fit([(x, y)] * 4, epochs=2, lr=1e-2, progress=False)  # amp on by default
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_distillation_on_digits_beats_training_alone():
    acc = digits_accuracies(seed=0)
    print(f"\ndigits: teacher {acc['teacher']:.3f}, student alone {acc['alone']:.3f}, "
          f"student distilled {acc['distilled']:.3f}")
    assert acc["teacher"] > 0.9
    assert acc["distilled"] > acc["alone"] + 0.01


def test_distributed_data_parallel_two_ranks():
    """Two gloo ranks on the CPU, each with half of every batch: both end with identical student
    and adapter parameters, equal to one process training on the full batches."""
    out = subprocess.run([sys.executable, str(HERE / "distill_ddp_worker.py")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "DDP OK" in out.stdout, out.stdout + out.stderr
