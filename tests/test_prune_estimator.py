"""The Hessian-norm estimator (MATH.md §2.3) against exact per-sample Hessians, and the unit-group
discovery that score / prune_units / the tracker stand on."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, vmap

import mapopt_native
from mapopt_native.prune import hessian_norm, recurrent_hessian_norm, unit_groups

D = torch.float64


class Residual(nn.Module):
    """x + W2 tanh(W1 x): a sub-mapping with no closed form."""

    def __init__(self, n, hidden):
        super().__init__()
        self.a, self.b = nn.Linear(n, hidden), nn.Linear(hidden, n)

    def forward(self, x):
        return x + F.silu(self.b(torch.tanh(self.a(x))))


def _brute_force(f, x):
    """Σ over entries of each output's per-sample Hessian squared, one sample at a time."""
    rows = []
    for b in range(x.shape[0]):
        h = hessian(lambda y: f(y.unsqueeze(0)).squeeze(0))(x[b])   # (m, n, n)
        rows.append(h.pow(2).sum((-2, -1)))
    return torch.stack(rows).mean(0)


def test_exact_matches_the_closed_form_of_a_dense_tanh_layer():
    layer = nn.Linear(6, 5).to(D)
    x = torch.randn(9, 6, dtype=D)
    exact = hessian_norm(lambda v: torch.tanh(layer(v)), x, exact=True)
    t = torch.tanh(layer(x)).detach()
    closed = layer.weight.detach().pow(2).sum(1).pow(2) * (-2 * t * (1 - t * t)).pow(2).mean(0)
    torch.testing.assert_close(exact.value, closed, rtol=1e-10, atol=1e-12)
    assert torch.all(exact.stderr == 0)


@pytest.mark.parametrize("probe", ["rademacher", "normal"])
@pytest.mark.parametrize("block", ["residual", "mlp"])
def test_estimate_within_three_standard_errors_of_exact(block, probe):
    n = 5
    f = Residual(n, 7).to(D) if block == "residual" else nn.Sequential(
        nn.Linear(n, 8), nn.GELU(), nn.Linear(8, 3), nn.Softplus()).to(D)
    x = torch.randn(12, n, dtype=D)
    exact = _brute_force(f, x)
    torch.testing.assert_close(hessian_norm(f, x, exact=True).value, exact.detach())
    est = hessian_norm(f, x, probes=600, chunk=100, probe=probe)
    z = (est.value - exact) / est.stderr
    assert torch.all(est.stderr > 0)
    assert torch.all(z.abs() < 3.5), z   # 3 standard errors, with a little room for m outputs
    # and it is an estimate, not the exact value by construction
    assert not torch.allclose(est.value, exact, rtol=1e-6, atol=0)


def test_independent_probes_avoid_the_same_probe_bias():
    # f(x) = softplus(1ᵀx) has a rank-one Hessian with a large trace: with u = v and Gaussian
    # probes the estimate would be (tr H)² + 2‖H‖_F² = 3‖H‖_F², far from ‖H‖_F².
    f = lambda x: F.softplus(x.sum(1, keepdim=True))  # noqa: E731
    x = torch.randn(8, 6, dtype=D)
    exact = _brute_force(f, x)
    est = hessian_norm(f, x, probes=2000, chunk=250, probe="normal")
    assert abs((est.value - exact) / est.stderr).item() < 3.5
    assert abs((est.value - 3 * exact) / est.stderr).item() > 10


def test_streams_batches_like_one_batch():
    f = Residual(4, 6).to(D)
    x = torch.randn(10, 4, dtype=D)
    whole = hessian_norm(f, x, exact=True).value
    parts = hessian_norm(f, [x[:3], x[3:]], exact=True).value
    torch.testing.assert_close(parts, whole)


def _cell_hessian_norm(cell: nn.Module, x, h, c=None):
    """Exact per-row ‖∇² h_t‖² of torch's own cell, as a function of [x, h] (c held)."""
    params = dict(cell.named_parameters())
    n_in = x.shape[1]

    def f(xh, *held):
        args = (xh[:n_in].unsqueeze(0), xh[n_in:].unsqueeze(0))
        if held:
            return functional_call(cell, params, (args[0], (args[1], held[0].unsqueeze(0))))[0][0]
        return functional_call(cell, params, args)[0]
    xh = torch.cat([x, h], 1)
    held = () if c is None else (c,)
    return vmap(hessian(f))(xh, *held).pow(2).sum((-2, -1)).mean(0)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_recurrent_cell_mapping_exact_against_torch_cells(kind):
    # One step from a zero state: the rows are (x_0, 0[, 0]); torch's own cells are the oracle.
    I, H = 3, 4
    layer = (nn.GRU if kind == "gru" else nn.LSTM)(I, H).to(D)
    cell = (nn.GRUCell if kind == "gru" else nn.LSTMCell)(I, H).to(D)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in layer.state_dict().items()})
    x = torch.randn(1, 6, I, dtype=D)
    zeros = torch.zeros(6, H, dtype=D)
    expected = _cell_hessian_norm(cell, x[0], zeros, zeros if kind == "lstm" else None)
    got = recurrent_hessian_norm(layer, x, exact=True)
    torch.testing.assert_close(got.value, expected)


@pytest.mark.parametrize("cls", [mapopt_native.nn.GatedGRU, mapopt_native.nn.GatedLSTM, nn.LSTM])
def test_recurrent_estimate_within_three_standard_errors(cls):
    kwargs = {"gate": "gaussian"} if cls is not nn.LSTM else {}
    rnn = cls(3, 4, num_layers=2, bidirectional=True, **kwargs).to(D)
    x = torch.randn(5, 3, 3, dtype=D)
    exact = recurrent_hessian_norm(rnn, x, layer=1, exact=True)
    est = recurrent_hessian_norm(rnn, x, layer=1, probes=800, chunk=200)
    assert torch.all(((est.value - exact.value) / est.stderr).abs() < 3.5)


def test_recurrent_lengths_drop_padded_steps():
    rnn = nn.GRU(3, 4).to(D)
    x = torch.randn(4, 2, 3, dtype=D)
    lengths = torch.tensor([4, 2])
    with_lengths = recurrent_hessian_norm(rnn, x, exact=True, lengths=lengths).value
    # the same rows by hand: sequence 0 for 4 steps and sequence 1 for 2
    rows = torch.cat([x[:, 0], x[:2, 1]])
    h0 = recurrent_hessian_norm(rnn, x[:, :1], exact=True).value * 4
    h1 = recurrent_hessian_norm(rnn, x[:2, 1:], exact=True).value * 2
    torch.testing.assert_close(with_lengths, (h0 + h1) / rows.shape[0])


def test_estimator_bad_input():
    f = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"inputs must be \(B, n\) tensors.*\[3\]"):
        hessian_norm(f, torch.randn(3))
    with pytest.raises(ValueError, match="probes must be >= 2"):
        hessian_norm(f, torch.randn(4, 3), probes=1)
    with pytest.raises(ValueError, match="probe must be 'rademacher' or 'normal'"):
        hessian_norm(f, torch.randn(4, 3), probe="uniform")
    with pytest.raises(ValueError, match="held no samples"):
        hessian_norm(f, [])
    with pytest.raises(TypeError, match="needs an nn.GRU, nn.LSTM, GatedGRU or GatedLSTM"):
        recurrent_hessian_norm(f, torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\)"):
        recurrent_hessian_norm(nn.GRU(3, 2), torch.randn(2, 1, 3), layer=1)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 16, 10)
        self.gru = mapopt_native.nn.GatedGRU(10, 6, num_layers=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        z = F.relu(self.b2(self.c2(y)) + y)
        z = F.max_pool2d(F.leaky_relu(self.c3(z), 0.2), 2).flatten(1)
        h = torch.tanh(self.fc(z))
        o, _ = self.gru(h.unsqueeze(0))
        return self.head(o[-1])


def test_unit_groups_of_a_mixed_model():
    groups = {g.name: g for g in unit_groups(Mixed())}
    assert list(groups) == ["c1", "c2", "c3", "fc", "gru.l0", "gru.l1", "head"]
    c1, c2, c3, fc = groups["c1"], groups["c2"], groups["c3"], groups["fc"]
    assert isinstance(c1.batch_norm, nn.BatchNorm2d)
    assert c1.activation.name == "relu" and not c1.residual and "add" in c1.coupled
    assert c2.residual and c2.activation.name == "relu" and c2.coupled
    assert c3.activation.name == "leaky_relu" and c3.activation.options == {"negative_slope": 0.2}
    assert c3.flattened and [n for n, _ in c3.consumers] == ["fc"] and c3.coupled is None
    assert fc.activation.name == "tanh" and [n for n, _ in fc.consumers] == ["gru"]
    assert fc.coupled is None and fc.units == 10
    assert groups["gru.l0"].kind == "recurrent" and groups["gru.l1"].consumers[0][0] == "head"
    assert groups["head"].coupled == "its units reach the model's output"


def test_untraceable_model_names_the_way_out():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(TypeError, match="can't be traced by torch.fx.*Torch-Pruning"):
        unit_groups(Branchy())
