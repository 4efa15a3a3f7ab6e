"""GatedGRU / GatedLSTM layers and their whole-sequence ops against torch.nn.GRU / LSTM (sigmoid)
and a Python loop of the reference cells (every gate), MATH.md §1."""

import threading

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import mapopt_native
from mapopt_native import reference
from mapopt_native.nn import GatedGRU, GatedLSTM
from mapopt_native.ops import gated_gru_layer, gated_lstm_layer

from conftest import CPU_DTYPES, CUDA_DTYPES, assert_close

GATES = mapopt_native.GATES
ops = torch.ops.mapopt_native
LAYERS = {"gru": (GatedGRU, torch.nn.GRU), "lstm": (GatedLSTM, torch.nn.LSTM)}


def initial_states(kind, L, B, H, dtype, device="cpu", unbatched=False):
    shape = (L, H) if unbatched else (L, B, H)
    h = torch.randn(shape, dtype=dtype, device=device)
    return h if kind == "gru" else (h, torch.randn(shape, dtype=dtype, device=device))


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def forward_and_grads(module, x, hx, grad_seed):
    """Output, final states, and the gradients of a random projection of all of them w.r.t. the
    input, the initial states and every parameter."""
    leaves = [x] + [s for s in as_tuple(hx) if s is not None] + list(module.parameters())
    out, finals = module(x, hx)
    data = out.data if isinstance(out, PackedSequence) else out
    gen = torch.Generator().manual_seed(grad_seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)).sum()
               for t in (data,) + as_tuple(finals))
    grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])
    return data, as_tuple(finals), grads


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def matching_pair(kind, I, H, dtype, **kwargs):
    """Our layer and torch's, with the same state_dict."""
    ours_cls, torch_cls = LAYERS[kind]
    theirs = torch_cls(I, H, dtype=dtype, **kwargs)
    ours = ours_cls(I, H, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("num_layers,bidirectional,batch_first", [
    (1, False, False), (1, True, True), (2, False, True), (2, True, False), (3, True, False)])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("given_hx", [True, False])
def test_sigmoid_matches_torch(kind, num_layers, bidirectional, batch_first, dtype, given_hx):
    T, B, I, H = 7, 5, 9, 11
    ours, theirs = matching_pair(kind, I, H, dtype, num_layers=num_layers, batch_first=batch_first,
                                 bidirectional=bidirectional)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
    L = num_layers * (2 if bidirectional else 1)
    hx = initial_states(kind, L, B, H, dtype) if given_hx else None
    res_o = forward_and_grads(ours, leaf(x), tuple(map(leaf, as_tuple(hx))) if hx is not None
                              and kind == "lstm" else leaf(hx), 1)
    res_t = forward_and_grads(theirs, leaf(x), tuple(map(leaf, as_tuple(hx))) if hx is not None
                              and kind == "lstm" else leaf(hx), 1)
    for a, b in zip(res_o[0:1] + res_o[1], res_t[0:1] + res_t[1]):
        assert_close(a, b, scale=2)
    assert len(res_o[2]) == len(res_t[2])
    for a, b in zip(res_o[2], res_t[2]):
        assert_close(a, b, scale=20)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_packed_unsorted_matches_torch(kind, bidirectional, dtype):
    T, B, I, H = 8, 6, 5, 7
    ours, theirs = matching_pair(kind, I, H, dtype, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(T, B, I, dtype=dtype)
    lengths = torch.tensor([3, 8, 1, 5, 8, 2])  # unsorted, with ties
    hx = initial_states(kind, 2 * (2 if bidirectional else 1), B, H, dtype)
    results = []
    for module in (ours, theirs):
        xl = leaf(x)
        packed = pack_padded_sequence(xl, lengths, enforce_sorted=False)
        h = tuple(map(leaf, hx)) if kind == "lstm" else leaf(hx)
        out, finals = module(packed, h)
        assert isinstance(out, PackedSequence)
        padded, out_lengths = pad_packed_sequence(out)
        assert torch.equal(out_lengths, lengths)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), dtype=dtype).view_as(padded)).sum()
        loss = loss + sum((f * f).sum() for f in as_tuple(finals))
        grads = torch.autograd.grad(loss, [xl] + list(as_tuple(h)) + list(module.parameters()))
        results.append((padded, as_tuple(finals), grads))
    (po, fo, go), (pt, ft, gt) = results
    assert_close(po, pt, scale=2)
    for a, b in zip(fo, ft):
        assert_close(a, b, scale=2)
    for a, b in zip(go, gt):
        assert_close(a, b, scale=20)


def unsorted_lengths(T, B, longest):
    """Random lengths in [1, T] for B sequences, sequence `longest` of length T."""
    lengths = torch.randint(1, T + 1, (B,))
    lengths[longest] = T
    return lengths


def run_sequence(module, x, lengths=None):
    """The padded output (the input packed unsorted when lengths are given), the final states and
    the gradients of a fixed projection of the output w.r.t. the input and every parameter."""
    def as_input(t):
        return t if lengths is None else pack_padded_sequence(t, lengths, enforce_sorted=False)

    def padded(out):
        return out if lengths is None else pad_packed_sequence(out)[0]

    xl = leaf(x)
    out, finals = module(as_input(xl))
    out = padded(out)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=x.dtype).view_as(out)).sum()
    grads = torch.autograd.grad(loss, [xl] + list(module.parameters()))
    with torch.no_grad():
        inference = padded(module(as_input(x))[0])
    return out, as_tuple(finals), grads, inference


def assert_runs_close(ours, theirs, grad_scale):
    (oo, fo, go, io), (ot, ft, gt, it) = ours, theirs
    assert_close(oo, ot, scale=2)
    assert_close(io, it, scale=2)
    for a, b in zip(fo, ft):
        assert_close(a, b, scale=2)
    for a, b in zip(go, gt):
        assert_close(a, b, scale=grad_scale)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_long_sequences_projected_in_blocks_match_torch(kind, dtype, packed):
    # Sizes whose input projection exceeds the CPU block budget (512 KiB: csrc/cpu/gated_cells.cpp),
    # so it is made in several blocks, block edges falling inside the packed batch's shrinking.
    T, B, I, H = 100, 64, 16, 64
    ours, theirs = matching_pair(kind, I, H, dtype, bidirectional=True)
    x = torch.randn(T, B, I, dtype=dtype)
    lengths = unsorted_lengths(T, B, 0) if packed else None
    assert_runs_close(run_sequence(ours, x, lengths), run_sequence(theirs, x, lengths), 100)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("H", [204, 20, 370])
def test_steps_split_over_threads_match_torch(kind, dtype, threads, H):
    # Steps big enough that the CPU layers' products (csrc/cpu/layer_products.h) split over
    # threads, by groups of units (one vector in the forward, four in the backward) and, where the
    # groups are fewer than twice the threads (H = 20, and the backward at H = 204), by rows too;
    # at H = 370 the LSTM's backward step product is past kOwnStepGradMacs (oneDNN's) and the
    # packed weights are kept in 2 MiB pages (csrc/cpu/scratch.h), in both dtypes. No H is a
    # multiple of the vector width (4 to 16 lanes), so the last group is partial;
    # the packed, unsorted lengths shrink the batch from 32 step by step, so the kernel's row
    # blocks take several sizes; both directions.
    T, B, I = 6, 32, 24
    ours, theirs = matching_pair(kind, I, H, dtype, bidirectional=True)
    x = torch.randn(T, B, I, dtype=dtype)
    lengths = unsorted_lengths(T, B, 3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = [run_sequence(m, x, lengths) for m in (ours, theirs)]
    finally:
        torch.set_num_threads(before)
    assert_runs_close(*results, 20)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("I,H,dtype", [(1100, 24, torch.float32), (1100, 24, torch.float64),
                                       (20, 1100, torch.float32)])
def test_products_deeper_than_a_slice_match_torch(kind, I, H, dtype):
    # Input or hidden sizes past the CPU kernel's depth slice (csrc/cpu/layer_products.h: 512
    # rows of a group's weights at AVX-512, 1024 at AVX2), so the products run in slices with
    # every row's sums kept between them, LSTM inference's summed projection and recurrent product
    # among them; padded input with strided rows (a slice of wider features, read in place by
    # that product) and packed input with unsorted lengths; both directions.
    T, B = 4, 9
    ours, theirs = matching_pair(kind, I, H, dtype, bidirectional=True)
    x = torch.randn(T, B, I + 7, dtype=dtype)[:, :, :I]
    for lengths in (None, unsorted_lengths(T, B, 2)):
        results = [run_sequence(m, x, lengths) for m in (ours, theirs)]
        assert_runs_close(*results, 20)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("H", [8, 1100])
def test_layer_ops_take_input_size_0(kind, H):
    # torch's modules and ours refuse input_size 0; the layer ops take it, the projection being
    # the bias alone (it used to divide by zero packing the empty weight). At H = 1100 LSTM
    # inference sums an empty projection and a recurrent product deeper than one slice.
    T, B, chunks = 3, 2, (3 if kind == "gru" else 4)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(T, B, 0, **f64)
    w_ih = torch.randn(chunks * H, 0, **f64)
    params = [0.05 * torch.randn(chunks * H, H, **f64), torch.randn(chunks * H, **f64),
              torch.randn(chunks * H, **f64)] + [torch.randn(B, H, **f64)
                                                 for _ in range(1 if kind == "gru" else 2)]
    w_hh, b_ih, b_hh, *states = [leaf(t) for t in params]
    layer = gated_gru_layer if kind == "gru" else gated_lstm_layer
    ours = layer(x, *states, w_ih, w_hh, b_ih, b_hh)
    with torch.no_grad():
        inference = layer(x, *states, w_ih, w_hh, b_ih, b_hh)[0]
    ref_out, ref_finals = reference.rnn(kind, x, tuple(s.unsqueeze(0) for s in states),
                                        [(w_ih, w_hh, b_ih, b_hh)])
    assert_close(ours[0], ref_out)
    assert_close(inference, ref_out)
    for a, b in zip(ours[1:], ref_finals):
        assert_close(a, b[0])
    proj = torch.randn_like(ref_out)
    grads = [torch.autograd.grad((out * proj).sum(), [w_hh, b_ih, b_hh, *states])
             for out in (ours[0], ref_out)]
    for a, b in zip(*grads):
        assert_close(a, b, scale=20)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_buffers_kept_between_calls(kind):
    # The CPU layers keep their packed weights and projection block between calls
    # (csrc/cpu/scratch.h): calls of other sizes and dtypes in between, a longer sequence (several
    # projection blocks) then a shorter one, must each match torch as if run alone.
    runs = [(100, 64, 16, 64, torch.float32), (7, 5, 9, 12, torch.float64),
            (100, 64, 16, 64, torch.float32), (3, 2, 40, 24, torch.float32)]
    for T, B, I, H, dtype in runs:
        ours, theirs = matching_pair(kind, I, H, dtype, bidirectional=True)
        x = torch.randn(T, B, I, dtype=dtype)
        assert_runs_close(run_sequence(ours, x), run_sequence(theirs, x), 100)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_threads_share_the_recycled_blocks(kind):
    # Threads running the same layer at once share the process's recycled blocks
    # (csrc/recycled_buffer.h, one lock) and keep their own gate-gradient buffers (scratch.h,
    # per thread): each thread's outputs and gradients must be what a lone call gives.
    T, B, I, H = 50, 64, 40, 128  # outputs, workspaces and gradients over a megabyte
    ours = LAYERS[kind][0](I, H, num_layers=2, bidirectional=True)
    xs = [torch.randn(T, B, I) for _ in range(4)]

    def run(x):
        out, _ = ours(x)
        return [out.detach()] + list(torch.autograd.grad((out * out).sum(), ours.parameters()))

    alone = [run(x) for x in xs]
    results = [[] for _ in xs]
    threads = [threading.Thread(target=lambda i=i: results[i].extend(run(xs[i]) for _ in range(3)))
               for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for expected, runs in zip(alone, results):
        assert len(runs) == 3
        for got in runs:
            for a, b in zip(got, expected):
                assert_close(a, b)  # threads may split a product differently: rounding only


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("onednn", [True, False])
def test_products_over_all_steps(dtype, onednn):
    # The CPU layers' backward products over all steps (weight and input gradients) run through
    # oneDNN for float32 operands it reads in place (row-major or transposed), through ATen
    # otherwise (strided operands, float64, oneDNN switched off): each against float64 torch.mm.
    N, M, K = 300, 70, 90
    d, x = torch.randn(N, M, dtype=dtype), torch.randn(N, K, dtype=dtype)
    w = torch.randn(M, K, dtype=dtype)
    cases = [(d.t(), x), (d, w), (d.t(), x.t().contiguous().t()),
             (torch.randn(N, 2 * M, dtype=dtype)[:, ::2].t(), x), (d[:, :50].t(), x)]
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn
    try:
        for a, b in cases:
            expected = torch.mm(a.double(), b.double())
            assert_close(mapopt_native._C.cpu_matmul(a, b), expected.to(dtype), scale=10)
    finally:
        torch.backends.mkldnn.enabled = before


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_results_outlive_later_calls(kind, packed, bidirectional):
    # A CPU layer call's outputs and workspaces come from blocks earlier calls' freed buffers left
    # (csrc/recycled_buffer.h), and its backward's gate gradients live in a buffer it keeps for the
    # next backward (csrc/cpu/scratch.h). Results held from earlier calls, and a graph whose
    # backward runs after other calls' forwards and backwards, must be what they were alone.
    # Sizes where every buffer is over a megabyte (one direction: the layer's own output, input
    # gradient and workspace reach the caller); equal and shrinking batches.
    T, B, I, H = 100, 64, 48, 64
    ours, theirs = matching_pair(kind, I, H, torch.float32, bidirectional=bidirectional)
    xs = [torch.randn(T, B, I) for _ in range(3)]
    lengths = unsorted_lengths(T, B, 0) if packed else None
    first = run_sequence(ours, xs[0], lengths)
    pending = ours(leaf(xs[1]))[0]  # its backward runs after the third call's
    third = run_sequence(ours, xs[2], lengths)
    second = torch.autograd.grad((pending * pending).sum(), list(ours.parameters()))
    reference_second = torch.autograd.grad((theirs(xs[1])[0] ** 2).sum(),
                                           list(theirs.parameters()))
    assert_runs_close(first, run_sequence(theirs, xs[0], lengths), 100)
    assert_runs_close(third, run_sequence(theirs, xs[2], lengths), 100)
    for a, b in zip(second, reference_second):
        assert_close(a, b, scale=100)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_weights_of_any_strides(kind, dtype):
    # The CPU layers regroup the weights they are given in place of a copy (layer_products.h):
    # transposed weights (columns contiguous) and a strided bias must give what their contiguous
    # copies give (those are checked against torch above), forward and backward.
    T, B, I, H = 5, 3, 24, 20
    chunks = 3 if kind == "gru" else 4
    x = torch.randn(T, B, I, dtype=dtype)
    states = [torch.randn(B, H, dtype=dtype) for _ in range(1 if kind == "gru" else 2)]
    C = chunks * H
    strided = [torch.randn(I, C, dtype=dtype).t(), torch.randn(H, C, dtype=dtype).t(),
               torch.randn(2 * C, dtype=dtype)[::2], torch.randn(C, dtype=dtype)]
    assert not any(w.is_contiguous() for w in strided[:3])
    layer = getattr(ops, f"gated_{kind}_seq_fwd")
    outputs = 1 + len(states)  # output and final states; the workspace after them
    runs = []
    for weights in (strided, [w.contiguous() for w in strided]):
        leaves = [leaf(t) for t in [x] + states + weights]
        out = layer(*leaves, None, False, "sigmoid", True)[:outputs]
        gen = torch.Generator().manual_seed(0)
        loss = sum((o * torch.randn(o.shape, dtype=dtype, generator=gen)).sum() for o in out)
        runs.append(list(out) + list(torch.autograd.grad(loss, leaves)))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def weights_of(module):
    return [module._weights(layer, d) for layer in range(module.num_layers)
            for d in range(module.num_directions)]


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("packed", [False, True])
def test_every_gate_matches_reference_loop(kind, gate, packed):
    ours_cls, _ = LAYERS[kind]
    T, B, I, H, L = 6, 4, 5, 8, 2
    dtype = torch.float64
    module = ours_cls(I, H, L, bidirectional=True, gate=gate, dtype=dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(4.0)  # larger pre-activations: every gate's tails matter
    x = torch.randn(T, B, I, dtype=dtype)
    hx = initial_states(kind, 2 * L, B, H, dtype)
    lengths = torch.tensor([6, 2, 4, 5]) if packed else None
    xl, hl = leaf(x), tuple(map(leaf, as_tuple(hx)))
    inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
    out, finals = module(inp, hl if kind == "lstm" else hl[0])
    out = pad_packed_sequence(out)[0] if packed else out
    params = list(module.parameters())
    g_out = torch.randn_like(out)
    loss = (out * g_out).sum() + sum(f.sum() for f in as_tuple(finals))
    grads = torch.autograd.grad(loss, [xl, *hl] + params)

    xr, hr = leaf(x), tuple(map(leaf, as_tuple(hx)))
    out_r, finals_r = reference.rnn(kind, xr, hr, weights_of(module), gate, True, lengths)
    loss_r = (out_r * g_out).sum() + sum(f.sum() for f in finals_r)
    grads_r = torch.autograd.grad(loss_r, [xr, *hr] + params)
    assert_close(out, out_r)
    for a, b in zip(as_tuple(finals), finals_r):
        assert_close(a, b)
    for a, b in zip(grads, grads_r):
        assert_close(a, b, scale=10)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_gru_layer(gate, reverse, packed):
    T, B, I, H = 3, 3, 2, 3
    d = dict(dtype=torch.float64, requires_grad=True)
    batch_sizes = torch.tensor([3, 2, 1]) if packed else None
    x = torch.randn(6, I, **d) if packed else torch.randn(T, B, I, **d)
    args = [x, torch.randn(B, H, **d), torch.randn(3 * H, I, **d), torch.randn(3 * H, H, **d),
            torch.randn(3 * H, **d), torch.randn(3 * H, **d)]

    def fn(*a):
        out, hy = gated_gru_layer(*a, batch_sizes=batch_sizes, reverse=reverse, gate=gate)
        return out, hy
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_lstm_layer(gate, reverse, packed):
    from mapopt_native.ops import gated_lstm_layer
    T, B, I, H = 3, 3, 2, 3
    d = dict(dtype=torch.float64, requires_grad=True)
    batch_sizes = torch.tensor([3, 3, 1]) if packed else None
    x = torch.randn(7, I, **d) if packed else torch.randn(T, B, I, **d)
    args = [x, torch.randn(B, H, **d), torch.randn(B, H, **d), torch.randn(4 * H, I, **d),
            torch.randn(4 * H, H, **d), torch.randn(4 * H, **d), torch.randn(4 * H, **d)]

    def fn(*a):
        return gated_lstm_layer(*a, batch_sizes=batch_sizes, reverse=reverse, gate=gate)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("packed,reverse", [(False, False), (True, True)])
def test_opcheck(kind, packed, reverse):
    T, B, I, H = 4, 3, 5, 6
    chunks = 3 if kind == "gru" else 4
    d = dict(dtype=torch.float32, requires_grad=True)
    batch_sizes = torch.tensor([3, 2, 2, 1]) if packed else None
    x = torch.randn(8, I, **d) if packed else torch.randn(T, B, I, **d)
    states = [torch.randn(B, H, **d) for _ in range(1 if kind == "gru" else 2)]
    w = [torch.randn(chunks * H, I, **d), torch.randn(chunks * H, H, **d),
         torch.randn(chunks * H, **d), torch.randn(chunks * H, **d)]
    op = ops.gated_gru_seq_fwd if kind == "gru" else ops.gated_lstm_seq_fwd
    args = [x, *states, *w]
    torch.library.opcheck(op.default, args + [batch_sizes, reverse, "trig", True])
    # Inference keeps no workspace, so nothing may require a gradient there.
    args = [a.detach() for a in args]
    torch.library.opcheck(op.default, args + [batch_sizes, reverse, "trig", False])


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_inference_saves_nothing(kind):
    module = LAYERS[kind][0](4, 6, 2)
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        out, _ = module(x)
    assert out.grad_fn is None
    h = torch.zeros(3, 6)
    w = [t.detach() for t in module._weights(0, 0)]
    states = (h,) if kind == "gru" else (h, h)
    op = ops.gated_gru_seq_fwd if kind == "gru" else ops.gated_lstm_seq_fwd
    saved = op(x, *states, *w, None, False, "sigmoid", False)[len(states) + 1:]
    assert all(t.numel() == 0 for t in saved)
    saved = op(x, *states, *w, None, False, "sigmoid", True)[len(states) + 1:]
    assert saved[0].shape == (15, 4 * 6)
    # Differentiating an inference run is a clear error, not garbage.
    xg = x.clone().requires_grad_()
    out = op(xg, *states, *w, None, False, "sigmoid", False)[0]
    with pytest.raises(ValueError, match="workspace is empty: the forward ran with need_workspace=False"):
        out.sum().backward()


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = GatedGRU(6, 8, num_layers=2, bidirectional=True, gate="gaussian",
                            batch_first=True)
        self.lstm = GatedLSTM(16, 8, gate="trig")
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.gru(x)
        z, (h, c) = self.lstm(y.transpose(0, 1))
        return self.head(z).sum(0) + self.head(h[0] * c[0])


def test_compiled_model_fullgraph():
    model = Tagger()
    x = torch.randn(4, 7, 6)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert_close(out, eager, scale=4)
    for a, b in zip(grads, eager_grads):
        assert_close(a, b, scale=20)


def test_export_with_dynamic_batch_and_length():
    # torch.export traces the ops through their fake kernels; the exported program runs other
    # batch sizes and sequence lengths than the example's.
    model = Tagger().eval()
    x = torch.randn(4, 7, 6)
    dims = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("steps")}}
    exported = torch.export.export(model, (x,), dynamic_shapes=dims).module()
    for shape in ((4, 7, 6), (3, 11, 6), (2, 2, 6)):
        x = torch.randn(shape)
        assert_close(exported(x), model(x))


def test_torch_nn_gru_breaks_fullgraph_compile():
    # README's claim: torch.compile cannot capture nn.GRU in one graph, while it can ours.
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)rnn|gru|graph break|unsupported"):
        torch.compile(torch.nn.GRU(3, 4), fullgraph=True)(torch.randn(2, 1, 3))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_unbatched_input(kind):
    ours, theirs = matching_pair(kind, 3, 5, torch.float32, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3)
    hx = initial_states(kind, 4, None, 5, torch.float32, unbatched=True)
    for h in (None, hx):
        out_o, fin_o = ours(x, h)
        out_t, fin_t = theirs(x, h)
        assert out_o.shape == (6, 10)
        assert_close(out_o, out_t)
        for a, b in zip(as_tuple(fin_o), as_tuple(fin_t)):
            assert_close(a, b)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_batch_zero_and_no_steps(kind):
    module = LAYERS[kind][0](4, 5, 2, bidirectional=True)
    x = torch.randn(3, 0, 4, requires_grad=True)
    out, finals = module(x)
    assert out.shape == (3, 0, 10) and all(f.shape == (4, 0, 5) for f in as_tuple(finals))
    out.sum().backward()
    assert x.grad.shape == (3, 0, 4)
    with pytest.raises(ValueError, match="input must have at least one time step"):
        module(torch.randn(0, 2, 4))


def test_dropout_between_layers_in_training_only():
    module = GatedGRU(4, 5, num_layers=2, dropout=1.0)
    x = torch.randn(6, 3, 4)
    # dropout=1 zeroes the second layer's input in training: it then sees only zeros.
    module.train()
    out_train, h_train = module(x)
    second = GatedGRU(5, 5)
    second.load_state_dict({k.replace("_l1", "_l0"): v for k, v in module.state_dict().items()
                            if "_l1" in k})
    ref, _ = second(torch.zeros(6, 3, 5), h_train.new_zeros(1, 3, 5))
    assert_close(out_train, ref)
    module.eval()
    out_eval, _ = module(x)
    assert (out_eval - out_train).abs().max() > 1e-3


# ------------------------------------------------------------------ drop-in details


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_rnn_base_extras(kind):
    # What code written for nn.GRU / nn.LSTM reads or calls besides forward.
    for bias in (True, False):
        ours, theirs = matching_pair(kind, 3, 5, torch.float32, num_layers=2, bidirectional=True,
                                     bias=bias)
        assert ours.proj_size == theirs.proj_size == 0
        before = [p.clone() for p in ours.parameters()]
        assert ours.flatten_parameters() is None
        assert all(torch.equal(a, b) for a, b in zip(before, ours.parameters()))
        assert len(ours.all_weights) == len(theirs.all_weights) == 4
        for a, b in zip(ours.all_weights, theirs.all_weights):
            assert len(a) == len(b) == (4 if bias else 2)
            assert all(isinstance(p, torch.nn.Parameter) and torch.equal(p, q)
                       for p, q in zip(a, b))


def _weighted_sum(tensors):
    return sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in tensors)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("compiled", [False, True])
def test_autocast_runs_layers_in_float32(kind, compiled):
    # A bfloat16 input under autocast (forward and backward inside the region) against the float32
    # layer run outside autocast on the same values: equal outputs and parameter gradients. A
    # missing rule for the forward or the backward op fails here (mixed dtypes, or products
    # autocast to bfloat16). The input's gradient comes back in bfloat16, summed there from the two
    # directions' casts: it agrees to bfloat16's precision.
    torch.manual_seed(0)
    rnn = LAYERS[kind][0](6, 8, num_layers=2, bidirectional=True)
    params = list(rnn.parameters())
    x = torch.randn(5, 3, 6).bfloat16().requires_grad_()
    torch._dynamo.reset()
    run = torch.compile(rnn, fullgraph=True) if compiled else rnn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, finals = run(x)
        finals = as_tuple(finals)
        assert out.dtype == torch.float32 and all(f.dtype == torch.float32 for f in finals)
        grads = torch.autograd.grad(_weighted_sum((out,) + finals), [x] + params)
    ref_out, ref_finals = rnn(x.float())
    ref_finals = as_tuple(ref_finals)
    ref_grads = torch.autograd.grad(_weighted_sum((ref_out,) + ref_finals), [x] + params)
    for a, b in zip((out, *finals, *grads[1:]), (ref_out, *ref_finals, *ref_grads[1:]),
                    strict=True):
        assert_close(a, b, scale=4)
    assert grads[0].dtype == torch.bfloat16
    assert_close(grads[0].float(), ref_grads[0].bfloat16().float(), dtype=torch.bfloat16)
    # float64 is left alone by autocast.
    rnn = LAYERS[kind][0](6, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rnn(torch.randn(5, 3, 6, dtype=torch.float64))[0].dtype == torch.float64


# ------------------------------------------------------------------ bad input


def test_wrong_hx_shape():
    with pytest.raises(ValueError, match=r"hx must have shape \[2, 3, 5\]"):
        GatedGRU(4, 5, num_layers=2)(torch.randn(6, 3, 4), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match=r"c_0 must have shape \[1, 3, 5\]"):
        GatedLSTM(4, 5)(torch.randn(6, 3, 4), (torch.randn(1, 3, 5), torch.randn(1, 2, 5)))


def test_half_precision_on_the_cpu():
    module = GatedLSTM(4, 5).bfloat16()
    with pytest.raises(TypeError, match="input must be float32 or float64 on the CPU, got "
                       r"BFloat16 \(the Python package's ops run them in float32 under "
                       "torch.autocast"):
        module(torch.randn(6, 3, 4, dtype=torch.bfloat16))


def test_wrong_input_size():
    with pytest.raises(ValueError, match="input has 3 features, expected input_size=4"):
        GatedGRU(4, 5)(torch.randn(6, 3, 3))
    with pytest.raises(ValueError, match="input must be 3-D"):
        GatedLSTM(4, 5)(torch.randn(6, 3, 4, 1))


def test_lengths_longer_than_sequence():
    x = torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match="lengths longer than the padded sequence"):
        GatedGRU(4, 5)(pack_padded_sequence(x, torch.tensor([7, 3]), enforce_sorted=False))


def test_malformed_batch_sizes():
    data = torch.randn(6, 4)
    bad = PackedSequence(data, torch.tensor([2, 3, 1]))  # increasing: not a valid packing
    with pytest.raises(ValueError, match=r"batch_sizes must be positive and non-increasing, got \[2, 3, 1\]"):
        GatedGRU(4, 5)(bad)
    module = GatedLSTM(4, 5)
    with pytest.raises(ValueError, match="batch_sizes sum to 5 rows but its data has 6"):
        module(PackedSequence(data, torch.tensor([3, 2])))
    h = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="batch_sizes sum to 5 rows but the packed input has 6"):
        ops.gated_lstm_seq_fwd(data, h, h, *module._weights(0, 0), torch.tensor([3, 2]), False,
                               "sigmoid", False)


def test_unknown_gate():
    with pytest.raises(ValueError, match="gate must be one of 'sigmoid', 'gaussian', 'trig'"):
        GatedGRU(4, 5, gate="softsign")


# ------------------------------------------------------------------ CUDA vs CPU


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_matches_cpu(kind, gate, dtype, packed):
    ours_cls, _ = LAYERS[kind]
    T, B, I, H = 9, 5, 16, 24
    cpu = ours_cls(I, H, 2, bidirectional=True, gate=gate, dtype=torch.float64)
    rounded = lambda t: t.to(dtype).to(torch.float64)  # noqa: E731
    with torch.no_grad():
        for p in cpu.parameters():
            p.copy_(rounded(p))
    gpu = ours_cls(I, H, 2, bidirectional=True, gate=gate, device="cuda", dtype=dtype)
    gpu.load_state_dict(cpu.state_dict())
    x = rounded(torch.randn(T, B, I, dtype=torch.float64))
    lengths = torch.tensor([9, 3, 7, 1, 9])
    results = []
    for module, dev, dt in ((cpu, "cpu", torch.float64), (gpu, "cuda", dtype)):
        xl = x.to(dev, dt).requires_grad_()
        inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
        out, finals = module(inp)
        data = out.data if packed else out
        loss = (data.double() * torch.linspace(-1, 1, data.numel(), dtype=torch.float64,
                                               device=dev).view_as(data)).sum()
        grads = torch.autograd.grad(loss, [xl] + list(module.parameters()))
        results.append([data] + list(as_tuple(finals)) + list(grads))
    for a, b in zip(results[1][:-len(list(gpu.parameters())) - 1], results[0]):
        assert_close(a.cpu().double(), b, dtype=dtype, scale=4)
    for a, b in zip(results[1][-len(list(gpu.parameters())) - 1:],
                    results[0][-len(list(cpu.parameters())) - 1:]):
        assert_close(a.cpu().double(), b, dtype=dtype, scale=40)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_cuda_autocast_runs_layers_in_float32(kind):
    rnn = LAYERS[kind][0](6, 8, num_layers=2, device="cuda")
    x = torch.randn(5, 3, 6, device="cuda").half()
    with torch.autocast("cuda", dtype=torch.float16):
        out, _ = rnn(x)
    assert out.dtype == torch.float32
    assert_close(out, rnn(x.float())[0])
