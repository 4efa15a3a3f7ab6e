"""score() with every criterion, ImportanceTracker, the Torch-Pruning adapter, and distributed
scoring, against independent references: per-sample torch.func Hessians of each unit's sub-mapping,
hand-written classic criteria, and the single-process result."""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, vmap

import mapopt_native
from mapopt_native.prune import ImportanceTracker, hessian_norm, recurrent_hessian_norm, score

D = torch.float64


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc3(F.silu(self.fc2(torch.tanh(self.fc1(x)))))


class CNN(nn.Module):
    """conv-BN-softplus, a residual conv-BN-add-gelu, conv-tanh, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, dilation=1), nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 3, 3, stride=2, padding=1)
        self.act1, self.act2 = nn.Softplus(), nn.GELU()
        self.fc = nn.Linear(3 * 9, 5)

    def forward(self, x):
        y = self.act1(self.b1(self.c1(x)))
        y = self.act2(self.b2(self.c2(y)) + y)
        return self.fc(torch.tanh(self.c3(y)).flatten(1))


def _randomise_batch_norm(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return model.eval()


def _inputs_of(model, module, x):
    """What `module` receives when `model` runs on x (and the residual an add sees, by hooks)."""
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model(x)
    h.remove()
    return seen[0]


def _per_unit_exact(f, x):
    """Σ over positions of ‖∇² f_{c,p}‖_F² per channel/unit c, averaged over samples (f: one
    sample in, one sample out, units first)."""
    h = vmap(hessian(f))(x)                   # (B, C, *pos, *in, *in)
    per = h.pow(2).reshape(x.shape[0], h.shape[1], -1).sum(-1)
    return per.mean(0)


def test_score_mlp_matches_per_sample_hessians():
    model = MLP().to(D)
    data = [torch.randn(10, 6, dtype=D) for _ in range(3)]
    got = score(model, data)
    assert sorted(got) == ["fc1", "fc2"]           # fc3's units are the model's outputs
    x = torch.cat(data)
    expected1 = _per_unit_exact(lambda v: torch.tanh(model.fc1(v)), x)
    expected2 = _per_unit_exact(lambda v: F.silu(model.fc2(v)), _inputs_of(model, model.fc2, x))
    torch.testing.assert_close(got["fc1"], expected1.detach())
    torch.testing.assert_close(got["fc2"], expected2.detach())


def test_score_cnn_batch_norm_residual_and_borders():
    model = _randomise_batch_norm(CNN().to(D))
    x = torch.randn(4, 2, 6, 6, dtype=D)
    got = score(model, [x[:2], x[2:]])
    assert sorted(got) == ["c1", "c2", "c3"]
    with torch.no_grad():
        x1 = _inputs_of(model, model.c1, x)
        x2 = _inputs_of(model, model.c2, x)
        x3 = _inputs_of(model, model.c3, x)
    e1 = _per_unit_exact(lambda v: model.act1(model.b1(model.c1(v[None])))[0], x1)
    # c2's activation sees z + y: the residual y is held fixed (the other summand).
    e2 = []
    for b in range(x.shape[0]):
        r = x2[b:b + 1]
        e2.append(_per_unit_exact(lambda v: model.act2(model.b2(model.c2(v[None])) + r)[0],
                                  x2[b:b + 1]))
    e2 = torch.stack(e2).mean(0)
    e3 = _per_unit_exact(lambda v: torch.tanh(model.c3(v[None]))[0], x3)
    torch.testing.assert_close(got["c1"], e1.detach())
    torch.testing.assert_close(got["c2"], e2.detach())
    torch.testing.assert_close(got["c3"], e3.detach())


@pytest.mark.parametrize("cls", [mapopt_native.nn.GatedGRU, nn.LSTM])
def test_score_recurrent_layers_by_the_estimator(cls):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cls(3, 4, num_layers=2, bidirectional=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    model = Net().to(D)
    x = torch.randn(5, 3, 3, dtype=D)
    got = score(model, [x], exact=True)
    assert sorted(got) == ["rnn.l0", "rnn.l1"]
    for layer in (0, 1):
        expected = recurrent_hessian_norm(model.rnn, x, layer, exact=True).value
        torch.testing.assert_close(got[f"rnn.l{layer}"], expected)
    estimated = score(model, [x], probes=64)
    assert all(torch.all(estimated[k] > 0) for k in estimated)


def test_smoothed_relu_needs_sigma():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="sigma"):
        score(model, [torch.randn(3, 4)])
    got = score(model, [torch.randn(3, 4)], sigma=0.5)
    assert got["0"].shape == (5,) and torch.all(got["0"] > 0)


def test_magnitude_taylor_obd_random_against_hand_written_criteria():
    model = MLP().to(D)
    x, y = torch.randn(16, 6, dtype=D), torch.randn(16, 3, dtype=D)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    loss = nn.MSELoss()

    mag = score(model, criterion="magnitude")
    w, b = model.fc1.weight, model.fc1.bias
    torch.testing.assert_close(mag["fc1"], (w.pow(2).sum(1) + b.pow(2)).sqrt().detach())

    taylor = score(model, data, "taylor", loss=loss)
    expected = 0
    for xb, yb in data:
        gw, gb = torch.autograd.grad(loss(model(xb), yb), (model.fc2.weight, model.fc2.bias))
        expected = expected + ((gw * model.fc2.weight).sum(1) + gb * model.fc2.bias).pow(2) / 2
    torch.testing.assert_close(taylor["fc2"], expected.detach())

    # OBD against the exact Hessian of the loss in the parameters the probes cover (fc1, fc2),
    # within 4 standard errors of the Rademacher estimate: for one probe the estimate of unit k is
    # ½ Σ_i a_i H_ii + ½ Σ_{i<j} (a_i + a_j) H_ij v_i v_j with a = θ² on the unit, 0 elsewhere.
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    flat = torch.cat([dict(model.named_parameters())[n].detach().flatten() for n in names])

    def loss_of(theta):
        params, at = {}, 0
        for n, shape in zip(names, shapes):
            params[n] = theta[at:at + shape.numel()].view(shape)
            at += shape.numel()
        return loss(torch.func.functional_call(model, params, (x[:8],)), y[:8])
    H = torch.autograd.functional.hessian(loss_of, flat)
    probes = 2000
    obd = score(model, data[:1], "obd", loss=loss, probes=probes)
    for unit in range(8):
        a = torch.zeros_like(flat)
        a[unit * 6:(unit + 1) * 6] = model.fc1.weight[unit].detach().pow(2)
        a[48 + unit] = model.fc1.bias[unit].detach().pow(2)
        exact = 0.5 * (a * torch.diagonal(H)).sum()
        pair = (a[:, None] + a[None, :]) * H
        var = 0.25 * torch.triu(pair.pow(2), diagonal=1).sum()
        assert abs(obd["fc1"][unit] - exact) < 4 * (var / probes).sqrt() + 1e-12, unit

    g = torch.Generator().manual_seed(3)
    r1 = score(model, criterion="random", generator=g)
    assert r1["fc1"].shape == (8,) and torch.all((r1["fc1"] >= 0) & (r1["fc1"] < 1))


def test_score_bad_input():
    model = MLP()
    with pytest.raises(ValueError, match="criterion must be one of"):
        score(model, [torch.randn(2, 6)], "fisher")
    with pytest.raises(ValueError, match="needs data"):
        score(model, None, "hessian_norm")
    with pytest.raises(ValueError, match="needs loss"):
        score(model, [(torch.randn(2, 6), torch.randn(2, 3))], "taylor")
    with pytest.raises(ValueError, match=r"needs \(input, target\) batches"):
        score(model, [torch.randn(2, 6)], "taylor", loss=nn.MSELoss())
    with pytest.raises(ValueError, match="held no batches"):
        score(model, [])


def test_tracker_accumulates_what_score_computes_and_leaves_the_model_alone():
    model = _randomise_batch_norm(CNN().to(D))
    data = [torch.randn(3, 2, 6, 6, dtype=D) for _ in range(3)]
    expected = score(model, data)
    reference_out = model(data[0])
    tracker = ImportanceTracker(model)
    with tracker:
        outs = [model(x) for x in data]
    torch.testing.assert_close(outs[0], reference_out)
    got = tracker.scores()
    assert sorted(got) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
    # Gradients through the tracked forward equal the plain model's.
    x = data[1].requires_grad_()
    g_plain = torch.autograd.grad(model(x).sum(), x)[0]
    with tracker:
        g_tracked = torch.autograd.grad(model(x).sum(), x)[0]
    torch.testing.assert_close(g_tracked, g_plain)
    assert "forward" not in model.__dict__                 # stopped: the class forward again
    tracker.reset()
    with pytest.raises(RuntimeError, match="no forward pass reached"):
        tracker.scores()


def test_tracker_needs_sigma_for_relu():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"\['0'\].*sigma"):
        ImportanceTracker(model)


# -------------------------------------------------------------------- Torch-Pruning integration

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.silu(self.bn1(self.conv1(x)))
        return F.silu(self.bn2(self.conv2(y)) + x)


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block1, self.block2 = Block(8), Block(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.silu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_torch_pruning_prunes_a_resnet_with_our_importance():
    tp = pytest.importorskip("torch_pruning")
    from mapopt_native.prune.torch_pruning import HessianNormImportance

    model = _randomise_batch_norm(ResNetLike())
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    ours = score(model, data)
    imp = HessianNormImportance(model, data, normalizer=None)
    # The group of block1.conv1's output channels: only conv1 produces them.
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=data[0])
    group = graph.get_pruning_group(model.block1.conv1, tp.prune_conv_out_channels,
                                    idxs=list(range(8)))
    torch.testing.assert_close(imp(group), ours["block1.conv1"].float())
    # The residual channels: the stem, both blocks' conv2 (through their adds) sum their scores.
    group = graph.get_pruning_group(model.stem, tp.prune_conv_out_channels, idxs=list(range(8)))
    expected = ours["stem"] + ours["block1.conv2"] + ours["block2.conv2"]
    torch.testing.assert_close(imp(group), expected.float())

    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.BasePruner(model, data[0], importance=HessianNormImportance(model, data),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before
    assert model.block1.conv1.out_channels == 4
    assert model(data[0]).shape == (4, 4)


# ------------------------------------------------------------------------------ distributed

def _distributed_worker(rank, world, init_file, data, state, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _randomise_batch_norm(CNN().to(D))
        model.load_state_dict(state)
        shard = data[rank::world]
        scores = score(model, shard)
        tracker = ImportanceTracker(model)
        with tracker:
            for x in shard:
                model(x)
        results[rank] = ({k: v.clone() for k, v in scores.items()},
                         {k: v.clone() for k, v in tracker.scores().items()})
    finally:
        dist.destroy_process_group()


def test_distributed_score_equals_single_process():
    model = _randomise_batch_norm(CNN().to(D))
    data = [torch.randn(3, 2, 6, 6, dtype=D) for _ in range(4)]
    expected = score(model, data)
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(2, os.path.join(tmp, "init"), data, model.state_dict(),
                                            results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        scores, tracked = results[rank]
        for k in expected:
            torch.testing.assert_close(scores[k], expected[k])
            torch.testing.assert_close(tracked[k], expected[k])
