"""Pruning surgery, fine-tuning and iterative schedules (MATH.md §2.5)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from mapopt_native.nn.layers import GatedGRU, GatedLSTM
from mapopt_native.prune.finetune import finetune, prune_iteratively
from mapopt_native.prune.graph import unit_groups
from mapopt_native.prune.surgery import prune_units

RNNS = (nn.GRU, nn.LSTM, GatedGRU, GatedLSTM)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: a thread pool only adds contention on a busy machine (5x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(hidden=8):
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def cnn(c1=4, c2=6, dim=2, pool=False):
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv2d, nn.BatchNorm2d)
    # Inputs are 6 wide: 6 after the padded conv, 4 after the second, 2 after the pooling.
    tail = [nn.AdaptiveAvgPool2d(2) if dim == 2 else nn.AdaptiveAvgPool1d(2)] if pool else []
    spatial = (2 if pool else 4) ** dim
    return nn.Sequential(conv(2, c1, 3, padding=1), bn(c1), nn.ReLU(), conv(c1, c2, 3), bn(c2),
                         nn.ReLU(), *tail, nn.Flatten(), nn.Linear(c2 * spatial, 3))


class RNNHead(nn.Module):
    """[Linear(4, proj) -> tanh ->] recurrent -> Linear head on the last axis, or (steps) on the
    output flattened over time."""

    def __init__(self, cls, hidden=6, num_layers=1, bidirectional=False, proj=None, steps=None):
        super().__init__()
        self.proj = nn.Linear(4, proj) if proj else None
        self.rnn = cls(proj or 4, hidden, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=True)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1) * (steps or 1), 3)
        self.steps = steps

    def forward(self, x):
        if self.proj is not None:
            x = torch.tanh(self.proj(x))
        out = self.rnn(x)[0]
        return self.head(out.flatten(1) if self.steps else out)


def randomise_batch_norms(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            for b in (m.weight, m.bias, m.running_mean):
                if b is not None:
                    b.data.normal_()
            m.running_var.data.uniform_(0.5, 2)


# (name, factory of the model from its sizes, the sizes, input shape)
CASES = [("mlp", mlp, (8,), (5, 6)),
         ("cnn2d", cnn, (4, 6), (3, 2, 6, 6)),
         ("cnn1d", lambda c1, c2: cnn(c1, c2, dim=1), (4, 6), (3, 2, 6)),
         ("cnn2d_pool", lambda c1, c2: cnn(c1, c2, pool=True), (4, 6), (3, 2, 6, 6)),
         ("mlp-nobias-bn", lambda h: nn.Sequential(nn.Linear(6, h, bias=False),
                                                   nn.BatchNorm1d(h, affine=False), nn.Tanh(),
                                                   nn.Linear(h, 3)), (8,), (5, 6))]
CASES += [(f"{cls.__name__}-{layers}l{'-bi' if bi else ''}",
           lambda h, cls=cls, layers=layers, bi=bi: RNNHead(cls, h, layers, bi), (6,), (3, 5, 4))
          for cls in RNNS for layers in (1, 2) for bi in (False, True)]
CASES += [("linear-GatedLSTM-2l-bi", lambda p, h: RNNHead(GatedLSTM, h, 2, True, proj=p), (8, 6),
           (3, 5, 4)),
          ("linear-GRU-bi", lambda p, h: RNNHead(nn.GRU, h, 1, True, proj=p), (8, 6), (3, 5, 4)),
          ("GatedGRU-bi-flattened", lambda h: RNNHead(GatedGRU, h, 1, True, steps=5), (6,),
           (3, 5, 4))]
IDS = [c[0] for c in CASES]


def build(case, dtype=torch.float64):
    _, factory, sizes, shape = case
    model = factory(*sizes).to(dtype)
    randomise_batch_norms(model)
    return model.eval(), torch.randn(shape, dtype=dtype)


def random_scores(model):
    return {g.name: torch.rand(g.units) for g in unit_groups(model)}


def shapes(model):
    return {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_amount_zero_leaves_the_model_untouched(case):
    model, x = build(case)
    before = model(x)
    params = dict(model.named_parameters())
    report = prune_units(model, random_scores(model), 0.0)
    assert torch.equal(model(x), before)
    assert all(params[k] is p for k, p in model.named_parameters())
    assert report.total_removed == 0 and all(not c.removed for c in report.groups.values())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pruned_model_has_the_smaller_model_shapes_and_trains(case):
    _, factory, sizes, _ = case
    model, x = build(case, torch.float32)
    expected = sum(g.units // 2 for g in unit_groups(model) if g.coupled is None)
    report = prune_units(model, random_scores(model), 0.5)
    smaller = factory(*(s - s // 2 for s in sizes))
    # Every parameter/buffer shape and every size attribute (repr) is the smaller model's.
    assert shapes(model) == shapes(smaller)
    assert repr(model) == repr(smaller)
    assert report.total_removed == expected
    rnn = getattr(model, "rnn", None)
    if isinstance(rnn, nn.RNNBase):  # torch's forward reads its list of weights, not the attributes
        assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))
    model.train()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name


def zero_outgoing(model, removed):
    """Zeroes everything the units `removed` ({group name: indices}) send forward, with the
    column layouts written out here independently of the surgery."""
    if isinstance(model, nn.Sequential):
        for name, units in removed.items():
            i = int(name)
            w = next(m for m in model[i + 1:] if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
                     ).weight.data
            # Input columns (a Linear after a flatten: channel-major) or a Conv's input channels.
            w.view(w.shape[0], model[i].weight.shape[0], -1)[:, units] = 0
        return
    rnn, hidden = model.rnn, model.rnn.hidden_size
    directions = ("", "_reverse") if rnn.bidirectional else ("",)
    if model.proj is not None:
        for sfx in directions:
            getattr(rnn, f"weight_ih_l0{sfx}").data[:, removed["proj"]] = 0
    for layer in range(rnn.num_layers):
        units = removed[f"rnn.l{layer}"]
        reads = ([getattr(rnn, f"weight_ih_l{layer + 1}{sfx}") for sfx in directions]
                 if layer + 1 < rnn.num_layers else [model.head.weight])
        for sfx in directions:
            getattr(rnn, f"weight_hh_l{layer}{sfx}").data[:, units] = 0
        for w in reads:  # features (time steps, directions, hidden unit): the unit axis last
            w.data.view(w.shape[0], -1, hidden)[:, :, units] = 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_removing_units_that_send_nothing_preserves_the_function(case):
    model, x = build(case)
    scores = {g.name: torch.randperm(g.units).double() for g in unit_groups(model)}
    expected = {g.name: sorted(torch.argsort(scores[g.name])[:g.units // 2].tolist())
                for g in unit_groups(model) if g.coupled is None}
    zero_outgoing(model, expected)
    before = model(x)
    report = prune_units(model, scores, 0.5)
    assert {k: c.removed for k, c in report.groups.items()} == expected
    assert all(c.after == c.before - len(c.removed) for c in report.groups.values())
    assert model(x).shape == before.shape
    assert_close(model(x), before)


def test_pruning_units_that_send_something_changes_the_function():
    model, x = build(CASES[0])
    before = model(x)
    prune_units(model, {"0": torch.rand(8)}, 0.5)
    assert (model(x) - before).abs().max() > 1e-3


def test_the_report_lists_the_lowest_scored_units_and_skips():
    model = mlp(10)
    scores = {"0": torch.tensor([5., 0., 9., 1., 7., 2., 8., 3., 6., 4.]), "2": torch.rand(3)}
    report = prune_units(model, scores, 0.35)
    assert report.groups["0"].removed == [1, 3, 5]
    assert (report.groups["0"].before, report.groups["0"].after) == (10, 7)
    assert report.skipped == {"2": "its units reach the model's output"}
    assert prune_units(model, {}, 0.5).skipped["0"] == "no score given"


def test_min_units_is_kept():
    model = mlp(4)
    report = prune_units(model, {"0": torch.rand(4)}, 0.9, min_units=2)
    assert report.groups["0"].after == 2 and model[0].out_features == 2


def deep_mlp():
    return nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 2))


def test_global_scope_ranks_scores_normalised_by_the_group_mean():
    # Layer "0" has large raw scores, eight of them low for that layer (0.36 of its mean);
    # layer "2" has small raw scores, the lowest 0.29 of its mean.
    scores = {"0": 100 * torch.tensor([1.] * 8 + [10.] * 2), "2": torch.arange(1., 7.)}
    model = deep_mlp()
    layer = prune_units(model, scores, 0.5)
    assert layer.groups["0"].removed == [0, 1, 2, 3, 4] and layer.groups["2"].removed == [0, 1, 2]
    model = deep_mlp()
    report = prune_units(model, scores, 0.5, scope="global")
    # 8 of 16 units go: layer 2's unit 0 (0.29), then seven of layer 0's 0.36 (raw scores would
    # empty layer 2 first; dividing by the sum would take all eight from layer 0).
    assert report.groups["2"].removed == [0]
    assert report.groups["0"].removed == list(range(7))
    assert (model[0].out_features, model[2].in_features, model[2].out_features) == (3, 3, 5)


def test_global_scope_prunes_every_layer_of_a_recurrent_module_alike():
    model = RNNHead(nn.GRU, 8, num_layers=2)
    scores = {"rnn.l0": torch.rand(8) * 1e-3, "rnn.l1": torch.rand(8)}
    report = prune_units(model, scores, 0.4, scope="global")
    removed = [len(report.groups[f"rnn.l{k}"].removed) for k in (0, 1)]
    assert removed[0] == removed[1] and 16 * 0.4 - 2 < sum(removed) <= 16 * 0.4
    assert model.rnn.hidden_size == 8 - removed[0]
    model(torch.randn(2, 3, 4)).sum().backward()


def test_coupled_and_unsupported_groups_are_skipped_with_the_reason():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x) + x))

    model = Residual()
    report = prune_units(model, random_scores(model), 0.5)
    assert "added to another branch" in report.skipped["a"] and model.a.out_features == 4

    class Returns(nn.Module):  # the recurrent output leaves the model: no layer may shrink
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 5, num_layers=2)

        def forward(self, x):
            return self.rnn(x)[0]

    model = Returns()
    report = prune_units(model, random_scores(model), 0.5)
    assert "model's output" in report.skipped["rnn.l1"]
    assert "rnn.l1" in report.skipped["rnn.l0"] and model.rnn.hidden_size == 5

    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3, groups=4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8, 2))
    report = prune_units(model, random_scores(model), 0.5)
    assert "grouped convolution (groups=4)" in report.skipped["0"]
    assert "grouped convolution (groups=4)" in report.skipped["2"]
    assert model[0].out_channels == 4 and report.total_removed == 0

    model = RNNHead(nn.LSTM, 6)
    model.rnn, model.head = nn.LSTM(4, 6, proj_size=3, batch_first=True), nn.Linear(3, 3)
    report = prune_units(model, random_scores(model), 0.5)
    assert report.skipped["rnn.l0"] == "it is an LSTM with proj_size > 0"


class Reuses(nn.Module):
    """a is called twice; c reads both a's and b's units; p's units reach rnn's initial state."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.p, self.rnn = nn.Linear(4, 4), nn.GRU(4, 4)

    def forward(self, x):
        x = self.c(torch.relu(self.a(torch.relu(self.a(x))))) + self.c(torch.relu(self.b(x)))
        h = torch.tanh(self.p(x))  # into rnn as its input and (another node) its initial state
        return self.rnn(h, h[-1:])[0]


def test_shared_modules_and_initial_states_are_coupled():
    model = Reuses()
    report = prune_units(model, random_scores(model), 0.5)
    assert report.skipped["a"] == "a is called more than once"
    assert report.skipped["b"] == "its consumer c is called more than once"
    assert report.skipped["p"] == "its units reach rnn other than as its input"
    assert report.total_removed == 0 and [g.name for g in unit_groups(model)].count("a") == 1


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5, True, "0.5", None])
def test_bad_amount_raises(amount):
    with pytest.raises(ValueError, match=r"amount must be a fraction in \[0, 1\)"):
        prune_units(mlp(), {}, amount)


def test_bad_arguments_raise_clearly():
    model = mlp()
    with pytest.raises(ValueError,
                       match=r"scores\['0'\] has shape \[7\], but group '0' has 8 units"):
        prune_units(model, {"0": torch.rand(7)}, 0.5)
    with pytest.raises(ValueError, match=r"scope must be one of \('layer', 'global'\), got 'net'"):
        prune_units(model, {}, 0.5, scope="net")
    with pytest.raises(ValueError, match=r"not unit groups of the model: \['fc'\]; the groups are "
                                         r"\['0', '2'\]"):
        prune_units(model, {"fc": torch.rand(8)}, 0.5)
    with pytest.raises(ValueError, match="min_units must be an integer >= 1, got 0"):
        prune_units(model, {}, 0.5, min_units=0)
    with pytest.raises(ValueError, match="non-finite"):
        prune_units(model, {"0": torch.full((8,), float("nan"))}, 0.5)
    assert model[0].out_features == 8


def regression(batches=8, size=16):
    torch.manual_seed(0)
    w = torch.randn(6, 3)
    xs = [torch.randn(size, 6) for _ in range(batches)]
    return [(x, torch.tanh(x @ w)) for x in xs]


def test_finetune_reduces_the_loss():
    model, data = mlp(16), regression()
    start = sum(F.mse_loss(model(x), y).item() for x, y in data) / len(data)
    history = finetune(model, data, F.mse_loss, epochs=6, lr=1e-2, progress=False)
    assert len(history) == 6 and model.training
    assert history[-1] < 0.5 * history[0] and history[-1] < 0.5 * start


def test_finetune_refuses_a_stale_optimizer_and_a_spent_generator():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    prune_units(model, {"0": torch.rand(8)}, 0.5)
    with pytest.raises(ValueError, match="optimizer holds parameters that are not the model's"):
        finetune(model, regression(1), F.mse_loss, optimizer=optimizer, progress=False)
    with pytest.raises(ValueError, match="no batches in epoch 2"):
        finetune(model, iter(regression(1)), F.mse_loss, epochs=2, progress=False)


def test_finetune_distils_from_a_frozen_teacher():
    torch.manual_seed(0)
    teacher = mlp(16)
    xs = [torch.randn(32, 6) for _ in range(8)]
    data = [(x, teacher(x).argmax(1)) for x in xs]
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = mlp(4)
    history = finetune(student, data, F.cross_entropy, epochs=5, lr=1e-2, teacher=teacher,
                       alpha=0.5, progress=False)
    assert history[-1] < 0.7 * history[0]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_iteratively_reaches_the_one_shot_size(scope):
    model, data = deep_mlp(), [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(2)]
    result = prune_iteratively(model, data, F.mse_loss, amount=0.6, steps=3,
                               scorer=random_scores, scope=scope, lr=1e-2, progress=False)
    assert len(result.reports) == 3 and all(len(h) == 1 for h in result.histories)
    sizes = [sum(c.after for c in r.groups.values()) for r in result.reports]
    assert sizes[0] > sizes[1] > sizes[2] == 16 - math.floor(0.6 * 16)
    if scope == "layer":  # 10 -> 4, 6 -> 3 like one-shot pruning, not the floors compounded
        assert (model[0].out_features, model[2].out_features) == (4, 3)
    model(torch.randn(3, 4)).sum().backward()


def test_prune_iteratively_shrinks_every_layer_of_a_recurrent_module_alike():
    model = RNNHead(GatedGRU, 9, num_layers=2, bidirectional=True)
    data = [(torch.randn(4, 5, 4), torch.randn(4, 5, 3))]
    result = prune_iteratively(model, data, F.mse_loss, amount=0.5, steps=2, scorer=random_scores,
                               finetune_epochs=1, progress=False)
    assert [r.groups["rnn.l1"].after for r in result.reports] == [7, 5]  # 9 * 0.5**0.5 -> 7 -> 5
    assert [r.groups["rnn.l0"].after for r in result.reports] == [7, 5]
    assert model.rnn.hidden_size == 5 and model.head.in_features == 10
    model(torch.randn(2, 5, 4)).sum().backward()
