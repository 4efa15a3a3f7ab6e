"""GatedGRUCell / GatedLSTMCell and their ops against torch.nn's cells (sigmoid) and the
pure-PyTorch reference (every gate), MATH.md §1."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mapopt_native
from mapopt_native import reference
from mapopt_native.nn import GatedGRUCell, GatedLSTMCell
from mapopt_native.ops import gated_gru_cell, gated_lstm_cell

from conftest import CPU_DTYPES, CUDA_DTYPES, assert_close

GATES = mapopt_native.GATES
ops = torch.ops.mapopt_native

CELLS = {
    "gru": (GatedGRUCell, torch.nn.GRUCell),
    "lstm": (GatedLSTMCell, torch.nn.LSTMCell),
}


def make_states(kind, B, H, dtype, device="cpu"):
    h = torch.randn(B, H, dtype=dtype, device=device)
    if kind == "gru":
        return h
    return h, torch.randn(B, H, dtype=dtype, device=device)


def flat(out):
    return out if isinstance(out, tuple) else (out,)


def run_with_grads(cell_or_fn, params, x, state, grads_out):
    """Forward, then gradients of sum(out_k * grads_out_k) w.r.t. x, the states and params."""
    x = x.detach().clone().requires_grad_()
    states = tuple(s.detach().clone().requires_grad_() for s in flat(state))
    out = flat(cell_or_fn(x, states[0] if len(states) == 1 else states))
    loss = sum((o * g).sum() for o, g in zip(out, grads_out))
    grads = torch.autograd.grad(loss, (x,) + states + tuple(params))
    return out, grads


def reference_fn(kind, cell):
    def fn(x, state):
        if kind == "gru":
            return reference.gru_cell(x, state, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                      cell.bias_hh, cell.gate)
        return reference.lstm_cell(x, state[0], state[1], cell.weight_ih, cell.weight_hh,
                                   cell.bias_ih, cell.bias_hh, cell.gate)
    return fn


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_sigmoid_matches_torch_cell(kind, dtype, bias):
    ours_cls, torch_cls = CELLS[kind]
    B, I, H = 13, 37, 45  # odd sizes exercise the vector tails
    theirs = torch_cls(I, H, bias=bias, dtype=dtype)
    ours = ours_cls(I, H, bias=bias, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(B, I, dtype=dtype)
    state = make_states(kind, B, H, dtype)
    grads_out = [torch.randn(B, H, dtype=dtype) for _ in flat(state)]
    out_o, g_o = run_with_grads(ours, list(ours.parameters()), x, state, grads_out)
    out_t, g_t = run_with_grads(theirs, list(theirs.parameters()), x, state, grads_out)
    for a, b in zip(out_o, out_t):
        assert_close(a, b)
    for a, b in zip(g_o, g_t):
        assert_close(a, b, scale=4)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_every_gate_matches_reference(kind, gate, dtype):
    ours_cls, _ = CELLS[kind]
    B, I, H = 9, 20, 67
    cell = ours_cls(I, H, gate=gate, dtype=dtype)
    # Wider weights than the default init so every gate sees large |z| (gaussian tails, trig
    # wrapping past ±pi/2).
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(6.0)
    x = torch.randn(B, I, dtype=dtype)
    state = make_states(kind, B, H, dtype)
    grads_out = [torch.randn(B, H, dtype=dtype) for _ in flat(state)]
    params = list(cell.parameters())
    out_o, g_o = run_with_grads(cell, params, x, state, grads_out)
    out_r, g_r = run_with_grads(reference_fn(kind, cell), params, x, state, grads_out)
    for a, b in zip(out_o, out_r):
        assert_close(a, b)
    for a, b in zip(g_o, g_r):
        assert_close(a, b, scale=4)


def test_gates_differ():
    # The gate argument reaches the kernel: the three families give different outputs.
    x, h = torch.randn(4, 8), torch.randn(4, 8)
    cell = GatedGRUCell(8, 8)
    outs = [gated_gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, g)
            for g in GATES]
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-3


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_gru(gate, bias):
    B, I, H = 3, 4, 5
    d = dict(dtype=torch.float64, requires_grad=True)
    args = [torch.randn(B, I, **d), torch.randn(B, H, **d), torch.randn(3 * H, I, **d),
            torch.randn(3 * H, H, **d)]
    args += [torch.randn(3 * H, **d), torch.randn(3 * H, **d)] if bias else [None, None]
    assert torch.autograd.gradcheck(lambda *a: gated_gru_cell(*a, gate=gate), args)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_lstm(gate, bias):
    B, I, H = 3, 4, 5
    d = dict(dtype=torch.float64, requires_grad=True)
    args = [torch.randn(B, I, **d), torch.randn(B, H, **d), torch.randn(B, H, **d),
            torch.randn(4 * H, I, **d), torch.randn(4 * H, H, **d)]
    args += [torch.randn(4 * H, **d), torch.randn(4 * H, **d)] if bias else [None, None]
    assert torch.autograd.gradcheck(lambda *a: gated_lstm_cell(*a, gate=gate), args)


def test_lstm_gradient_through_one_output_only():
    # Only h' (or only c') used: the other incoming gradient is None and counts as zero.
    cell = GatedLSTMCell(6, 7, gate="trig", dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    state = make_states("lstm", 5, 7, torch.float64)
    for which in (0, 1):
        g = torch.randn(5, 7, dtype=torch.float64)
        grads_out = [g, torch.zeros_like(g)] if which == 0 else [torch.zeros_like(g), g]
        _, g_ref = run_with_grads(reference_fn("lstm", cell), list(cell.parameters()), x, state,
                                  grads_out)
        xs = x.clone().requires_grad_()
        hs = tuple(s.clone().requires_grad_() for s in state)
        out = cell(xs, hs)[which]
        g_ours = torch.autograd.grad((out * g).sum(), (xs,) + hs + tuple(cell.parameters()))
        for a, b in zip(g_ours, g_ref):
            assert_close(a, b)


def opcheck_args(kind, gate, B=4, I=5, H=6, bias=True):
    chunks = 3 if kind == "gru" else 4
    d = dict(dtype=torch.float32, requires_grad=True)
    states = [torch.randn(B, H, **d)] * (1 if kind == "gru" else 2)
    states = [s.detach().clone().requires_grad_() for s in states]
    w = [torch.randn(chunks * H, I, **d), torch.randn(chunks * H, H, **d)]
    b = [torch.randn(chunks * H, **d), torch.randn(chunks * H, **d)] if bias else [None, None]
    return [torch.randn(B, I, **d)] + states + w + b + [gate]


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(kind, gate, bias):
    op = ops.gated_gru_cell_fwd if kind == "gru" else ops.gated_lstm_cell_fwd
    torch.library.opcheck(op.default, opcheck_args(kind, gate, bias=bias))


@pytest.mark.parametrize("gate", GATES)
def test_opcheck_backward(gate):
    x, h, w_ih, w_hh, b_ih, b_hh, _ = [a.detach() if torch.is_tensor(a) else a
                                       for a in opcheck_args("gru", gate)]
    hy, ws = ops.gated_gru_cell_fwd(x, h, w_ih, w_hh, b_ih, b_hh, gate)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(ops.gated_gru_cell_bwd.default,
                              (torch.randn_like(hy), x, h, w_ih, w_hh, ws, gate, True, mask))
    x, h, c, w_ih, w_hh, b_ih, b_hh, _ = [a.detach() if torch.is_tensor(a) else a
                                          for a in opcheck_args("lstm", gate)]
    hy, cy, ws = ops.gated_lstm_cell_fwd(x, h, c, w_ih, w_hh, b_ih, b_hh, gate)
    for ghy, gcy, mask in ((torch.randn_like(hy), torch.randn_like(cy), [True] * 4),
                           (None, torch.randn_like(cy), [False, True, True, False])):
        torch.library.opcheck(ops.gated_lstm_cell_bwd.default,
                              (ghy, gcy, x, h, c, w_ih, w_hh, cy, ws, gate, True, mask))


class TwoStepModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = GatedGRUCell(6, 8, gate="gaussian")
        self.lstm = GatedLSTMCell(8, 8, gate="trig")
        self.head = torch.nn.Linear(8, 3)

    def forward(self, xs):
        h = None
        state = None
        for x in xs.unbind(0):
            h = self.gru(x, h)
            state = self.lstm(h, state)
        return self.head(state[0])


def test_torch_compile_fullgraph():
    model = TwoStepModel()
    xs = torch.randn(3, 5, 6)
    eager_out = model(xs)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(xs)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert_close(out, eager_out)
    for a, b in zip(grads, eager_grads):
        assert_close(a, b, scale=4)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_non_contiguous_inputs(kind):
    ours_cls, _ = CELLS[kind]
    B, I, H = 6, 10, 12
    cell = ours_cls(I, H, gate="gaussian", dtype=torch.float64)
    x = torch.randn(I, B, dtype=torch.float64).t()  # transposed
    state = tuple(torch.randn(B, 2 * H, dtype=torch.float64)[:, ::2] for _ in range(
        1 if kind == "gru" else 2))  # column-strided
    assert not x.is_contiguous() and not state[0].is_contiguous()
    x_before, state_before = x.clone(), tuple(s.clone() for s in state)
    st_arg = state[0] if kind == "gru" else state
    grads_out = [torch.randn(B, H, dtype=torch.float64) for _ in state]
    out, g = run_with_grads(cell, list(cell.parameters()), x, st_arg, grads_out)
    out_r, g_r = run_with_grads(reference_fn(kind, cell), list(cell.parameters()),
                                x.contiguous(), tuple(s.contiguous() for s in state)
                                if kind == "lstm" else state[0].contiguous(), grads_out)
    for a, b in zip(out + g, out_r + g_r):
        assert_close(a, b)
    # Inputs are left untouched.
    assert torch.equal(x, x_before) and all(torch.equal(a, b) for a, b in zip(state, state_before))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_batch_zero(kind):
    ours_cls, _ = CELLS[kind]
    cell = ours_cls(5, 7)
    x = torch.randn(0, 5, requires_grad=True)
    out = flat(cell(x))
    assert all(o.shape == (0, 7) for o in out)
    sum(o.sum() for o in out).backward()
    assert x.grad.shape == (0, 5)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in cell.parameters())


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_unbatched_and_default_state(kind):
    ours_cls, torch_cls = CELLS[kind]
    theirs = torch_cls(5, 7)
    ours = ours_cls(5, 7)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5)
    for state in (None, make_states(kind, 1, 7, torch.float32)):
        if state is not None:
            state = state[0] if kind == "gru" else tuple(s[0] for s in state)
        for a, b in zip(flat(ours(x, state)), flat(theirs(x, state))):
            assert a.shape == (7,)
            assert_close(a, b)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_autocast_runs_cells_in_float32(kind):
    # bfloat16 input and state under autocast (forward and backward inside the region) against the
    # float32 cell run outside autocast on the same values: equal outputs and parameter gradients,
    # and the input's and state's gradients back in bfloat16. A missing rule for the forward or the
    # backward op fails here (mixed dtypes, or the backward's products autocast to bfloat16).
    torch.manual_seed(0)
    cell = CELLS[kind][0](5, 7)
    params = list(cell.parameters())
    x = torch.randn(4, 5).bfloat16()
    state = tuple(t.bfloat16() for t in flat(make_states(kind, 4, 7, torch.float32)))
    grads_out = [torch.linspace(-1, 1, 28).view(4, 7)] * 2

    def float32_cell(x, state):
        return cell(x.float(), tuple(t.float() for t in flat(state)) if kind == "lstm"
                    else state.float())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run_with_grads(cell, params, x, state, grads_out)
    ref_out, ref_grads = run_with_grads(float32_cell, params, x, state, grads_out)
    assert all(o.dtype == torch.float32 for o in out)
    for a, b in zip((*out, *grads[-len(params):]), (*ref_out, *ref_grads[-len(params):]),
                    strict=True):
        assert_close(a, b)
    for a, b in zip(grads[:-len(params)], ref_grads[:-len(params)], strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_state_dict_round_trip_and_init(kind):
    ours_cls, torch_cls = CELLS[kind]
    theirs, ours = torch_cls(11, 13), ours_cls(11, 13, gate="trig")
    assert {k: v.shape for k, v in theirs.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v)
    bound = 1 / 13 ** 0.5
    for p in ours.parameters():
        assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("gate", GATES)
def test_nan_propagates(kind, gate):
    ours_cls, _ = CELLS[kind]
    cell = ours_cls(4, 6, gate=gate)
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    out = flat(cell(x))
    for o in out:
        assert torch.isnan(o[1]).all() and not torch.isnan(o[0]).any() and not torch.isnan(o[2]).any()


# ------------------------------------------------------------------ bad input


def test_unknown_gate_lists_valid_names():
    with pytest.raises(ValueError, match="gate must be one of 'sigmoid', 'gaussian', 'trig', got 'relu'"):
        GatedGRUCell(3, 4, gate="relu")
    cell = GatedGRUCell(3, 4)
    with pytest.raises(ValueError, match="got 'tanh'"):
        gated_gru_cell(torch.randn(2, 3), torch.randn(2, 4), cell.weight_ih, cell.weight_hh,
                       gate="tanh")


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_wrong_feature_size(kind):
    cell = CELLS[kind][0](5, 7)
    with pytest.raises(ValueError, match=r"input has 6 features but weight_ih \[\d+, 5\] expects input_size=5"):
        cell(torch.randn(3, 6))


def test_wrong_hx_shape():
    with pytest.raises(ValueError, match=r"hx must have shape \(batch, hidden_size\) = \[3, 7\], got \[3, 8\]"):
        GatedGRUCell(5, 7)(torch.randn(3, 5), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"cx must have shape \(batch, hidden_size\) = \[3, 7\], got \[2, 7\]"):
        GatedLSTMCell(5, 7)(torch.randn(3, 5), (torch.randn(3, 7), torch.randn(2, 7)))
    with pytest.raises(ValueError, match="hidden state must be 2-D"):
        GatedGRUCell(5, 7)(torch.randn(3, 5), torch.randn(7))
    with pytest.raises(TypeError, match=r"hx must be a pair \(h, c\)"):
        GatedLSTMCell(5, 7)(torch.randn(3, 5), torch.randn(3, 7))


def test_dtype_mismatch():
    cell = GatedGRUCell(5, 7)
    with pytest.raises(TypeError, match="input has dtype Double but weight_ih has dtype Float|"
                       "weight_ih has dtype Float but input has dtype Double"):
        cell(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must be float32 or float64 on the CPU, got Long"):
        gated_gru_cell(torch.ones(3, 5, dtype=torch.long), torch.zeros(3, 7), cell.weight_ih,
                       cell.weight_hh)


def test_device_mismatch_reported_by_fake_kernel():
    # A meta tensor among CPU tensors dispatches to the fake kernel, which runs the same checks.
    cell = GatedGRUCell(5, 7)
    with pytest.raises(RuntimeError, match="hx is on meta but input is on cpu"):
        gated_gru_cell(torch.randn(3, 5), torch.randn(3, 7, device="meta"), cell.weight_ih,
                       cell.weight_hh, cell.bias_ih, cell.bias_hh)


def test_bad_bias_and_weights():
    cell = GatedLSTMCell(5, 7)
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    with pytest.raises(ValueError, match="bias_ih and bias_hh must be given together"):
        gated_lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, None)
    with pytest.raises(ValueError, match=r"bias_hh must have shape .* = \[28\], got \[27\]"):
        gated_lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh[:27])
    with pytest.raises(ValueError, match=r"weight_ih must have shape \(4\*hidden_size, input_size\)"):
        gated_lstm_cell(x, h, c, cell.weight_ih[:27], cell.weight_hh)
    with pytest.raises(ValueError, match="input must be 1-D .* or 2-D"):
        cell(torch.randn(2, 3, 5))


# ------------------------------------------------------------------ properties


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["gru", "lstm"]), gate=st.sampled_from(GATES),
       B=st.integers(0, 9), I=st.integers(1, 40), H=st.integers(1, 40),
       scale=st.floats(0.1, 10.0))
def test_property_matches_reference(kind, gate, B, I, H, scale):
    cell = CELLS[kind][0](I, H, gate=gate, dtype=torch.float64)
    x = scale * torch.randn(B, I, dtype=torch.float64)
    state = make_states(kind, B, H, torch.float64)
    grads_out = [torch.randn(B, H, dtype=torch.float64) for _ in flat(state)]
    params = list(cell.parameters())
    out, g = run_with_grads(cell, params, x, state, grads_out)
    out_r, g_r = run_with_grads(reference_fn(kind, cell), params, x, state, grads_out)
    for a, b in zip(out + g, out_r + g_r):
        assert_close(a, b, scale=10)


# ------------------------------------------------------------------ CUDA vs CPU


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_matches_cpu(kind, gate, dtype):
    B, I, H = 33, 48, 70
    cpu_cell = CELLS[kind][0](I, H, gate=gate, dtype=torch.float64)
    gpu_cell = CELLS[kind][0](I, H, gate=gate, device="cuda", dtype=dtype)
    gpu_cell.load_state_dict(cpu_cell.state_dict())
    x = torch.randn(B, I, dtype=torch.float64)
    state = make_states(kind, B, H, torch.float64)
    grads_out = [torch.randn(B, H, dtype=torch.float64) for _ in flat(state)]
    # The CPU side runs in float64 on the values the GPU side sees after rounding to dtype.
    rounded = lambda t: t.to(dtype).to(torch.float64)  # noqa: E731
    with torch.no_grad():
        for p in cpu_cell.parameters():
            p.copy_(rounded(p))
    x, grads_out = rounded(x), [rounded(g) for g in grads_out]
    state = rounded(state) if kind == "gru" else tuple(rounded(s) for s in state)
    out_c, g_c = run_with_grads(cpu_cell, list(cpu_cell.parameters()), x, state, grads_out)
    to_gpu = lambda t: t.to("cuda", dtype)  # noqa: E731
    out_g, g_g = run_with_grads(
        gpu_cell, list(gpu_cell.parameters()), to_gpu(x),
        to_gpu(state) if kind == "gru" else tuple(to_gpu(s) for s in state),
        [to_gpu(g) for g in grads_out])
    for a, b in zip(out_g, out_c):
        assert_close(a.cpu().double(), b, dtype=dtype)
    for a, b in zip(g_g, g_c):
        assert_close(a.cpu().double(), b, dtype=dtype, scale=8)


def test_build_info_reports_what_was_built():
    import os
    import shutil

    info = mapopt_native.build_info()
    assert set(info) == {"cpu", "cuda", "cuda_arch", "cpu_isa", "torch"}
    assert info["cpu"] is True and info["torch"] == torch.__version__
    assert info["cpu_isa"] in ("avx512", "avx2", "default")
    # setup.py compiles the CUDA kernels whenever torch is a CUDA build and nvcc is found.
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if torch.version.cuda and nvcc and os.environ.get("MAPOPT_CUDA") != "0":
        assert info["cuda"] is True and info["cuda_arch"]
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "mapopt_native::gated_gru_cell_fwd", "CUDA")
    assert has_cuda_kernel == info["cuda"]


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_cell_ops_take_input_size_0(kind, dtype):
    # torch's cells and ours refuse input_size 0; the cell ops take it, the projection being the
    # bias alone (oneDNN, which the float32 products go through, refuses an empty inner
    # dimension: such products take ATen's).
    B, H, chunks = 3, 10, (3 if kind == "gru" else 4)
    x, w_ih = torch.randn(B, 0, dtype=dtype), torch.randn(chunks * H, 0, dtype=dtype)
    params = [torch.randn(chunks * H, H, dtype=dtype), torch.randn(chunks * H, dtype=dtype),
              torch.randn(chunks * H, dtype=dtype)] + [torch.randn(B, H, dtype=dtype)
                                                       for _ in range(1 if kind == "gru" else 2)]
    w_hh, b_ih, b_hh, *states = [t.requires_grad_() for t in params]
    ours = (gated_gru_cell if kind == "gru" else gated_lstm_cell)(x, *states, w_ih, w_hh, b_ih,
                                                                   b_hh)
    ref = (reference.gru_cell if kind == "gru" else reference.lstm_cell)(x, *states, w_ih, w_hh,
                                                                          b_ih, b_hh, "sigmoid")
    ours, ref = (ours,) if kind == "gru" else ours, (ref,) if kind == "gru" else ref
    grads = []
    for outs in (ours, ref):
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)).sum()
                   for o in outs)
        grads.append(torch.autograd.grad(loss, [w_hh, b_ih, b_hh, *states]))
    for a, b in zip(ours, ref):
        assert_close(a, b)
    for a, b in zip(*grads):
        assert_close(a, b, scale=10)
