"""score(): per-unit importance of every prunable unit group of a model (MATH.md §2, §2.4).

Criteria: hessian_norm (the article's, through the fused ops; the estimator for recurrent layers),
magnitude, taylor, obd, random. Data are streamed: each batch adds to per-unit sums, and under
torch.distributed the sums and counts are all-reduced, so every rank gets the result of the whole
data set."""

import warnings
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..ops import hessian_norm as ops
from .estimator import recurrent_hessian_norm
from .graph import RECURRENT, UnitGroup, trace, unit_groups

CRITERIA = ("hessian_norm", "magnitude", "taylor", "obd", "random")


def scored_groups(model: nn.Module) -> list[UnitGroup]:
    """The groups score() covers: every producer whose units are read by another layer or pass
    a residual add (coupled ones too; prune_units skips those). The model's output layer is not
    among them: its units are the model's outputs."""
    return [g for g in unit_groups(model) if g.consumers or g.residual]


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _folded(group: UnitGroup) -> tuple[Tensor, Tensor | None]:
    m = group.module
    if group.batch_norm is None:
        return m.weight, m.bias
    return ops.fold_batch_norm(m.weight, m.bias, group.batch_norm)


def curvature_scale(group: UnitGroup, input_shape) -> Tensor:
    """s of MATH.md §2.1 for the group's (BatchNorm-folded) producer: ‖w_k‖² per unit for a
    Linear, the in-bounds tap sums of w_c² per output position for a convolution (input_shape:
    the producer's input, whose spatial size fixes the borders)."""
    weight, _ = _folded(group)
    m = group.module
    if isinstance(m, nn.Linear):
        return weight.pow(2).sum(1)
    ones = weight.new_ones((1, m.in_channels, *input_shape[2:]))
    conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        raise ValueError(f"{group.name}: padding {m.padding!r} / padding_mode {m.padding_mode!r} "
                         "is not supported by the Hessian-norm criterion (zero padding only)")
    return conv(ones, weight.pow(2), None, m.stride, m.padding, m.dilation, m.groups)[0]


class _Capture(fx.Interpreter):
    """Runs the traced model and hands the first argument of chosen nodes to callbacks."""

    def __init__(self, gm: fx.GraphModule, watch: dict):
        super().__init__(gm)
        self.watch = watch

    def run_node(self, n):
        for callback in self.watch.get(n.name, ()):
            args, _ = self.fetch_args_kwargs_from_env(n)
            callback(args[0])
        return super().run_node(n)


def _activation_options(group: UnitGroup, sigma) -> dict:
    act = group.activation
    return dict(activation=act.name, sigma=sigma, **act.options)


def activation_site_term(group: UnitGroup, z: Tensor, s: Tensor, sigma) -> tuple:
    """At the group's activation, in one fused pass over its input z: (φ(z), the per-unit sum of
    the Hessian-norm term over the samples, the number of samples). A Linear's leading dims are
    all samples; a convolution's positions are summed into their channel."""
    rows = z.reshape(-1, z.shape[-1]) if isinstance(group.module, nn.Linear) else z
    acc = rows.new_zeros(rows.shape[1:])
    y = ops.activation_with_hessian_norm(rows, s, acc, **_activation_options(group, sigma))
    return y.reshape(z.shape), acc.reshape(acc.shape[0], -1).sum(1), rows.shape[0]


def _hessian_norm_watchers(group: UnitGroup, node_names: dict, sums: dict, sigma, probes,
                           exact, max_rows, generator):
    """What to capture for one group during the forward pass, and how it adds to sums[name]
    (a [per-unit sum, sample count] pair)."""
    name, m = group.name, group.module

    def add(total, count):
        accumulate(sums, name, total, count)

    if isinstance(m, RECURRENT):
        def on_recurrent_input(x):
            lengths = None
            if isinstance(x, nn.utils.rnn.PackedSequence):
                x, lengths = nn.utils.rnn.pad_packed_sequence(x, batch_first=m.batch_first)
            elif x.dim() == 2:  # unbatched
                x = x.unsqueeze(1 if not m.batch_first else 0)
            est = recurrent_hessian_norm(m, x, group.layer, probes=probes, exact=exact,
                                         max_rows=max_rows, generator=generator, lengths=lengths)
            batch = x.shape[0 if m.batch_first else 1]
            add(est.value * batch, batch)
        return {node_names[m]: [on_recurrent_input]}

    if group.residual:
        # The activation's input is z + (the other branch): capture it there, with s from the
        # producer's input size, and accumulate through the fused activation op.
        shape = {}

        def on_producer_input(x):
            shape["input"] = x.shape

        def on_pre_activation(z):
            add(*activation_site_term(group, z, curvature_scale(group, shape["input"]), sigma)[1:])
        return {node_names[m]: [on_producer_input],
                group.activation.site.name: [on_pre_activation]}

    weight, bias = m.weight, m.bias
    options = _activation_options(group, sigma)
    options["batch_norm"] = group.batch_norm
    if isinstance(m, nn.Linear):
        def on_input(x):
            x = x.detach().reshape(-1, x.shape[-1])
            add(ops.hessian_norm_linear(x, weight.detach(), _detach(bias), reduction="sum",
                                        **options), x.shape[0])
    else:
        fn = ops.hessian_norm_conv1d if isinstance(m, nn.Conv1d) else ops.hessian_norm_conv2d

        def on_input(x):
            add(fn(x.detach(), weight.detach(), _detach(bias), m.stride, m.padding, m.dilation,
                   m.groups, reduction="sum", **options), x.shape[0])
    return {node_names[m]: [on_input]}


def _detach(t):
    return None if t is None else t.detach()


def _hessian_norm(model, groups, data, sigma, probes, exact, max_rows, max_batches, generator):
    missing = [g.name for g in groups if g.activation is None and not isinstance(g.module, RECURRENT)]
    if missing:
        warnings.warn(f"score: {missing} have no activation before the next layer: their "
                      "sub-mappings are linear (zero Hessian), so hessian_norm can't rank their "
                      "units; they are left out", stacklevel=3)
    groups = [g for g in groups if g.name not in missing]
    gm = trace(model)
    modules = dict(gm.named_modules())
    node_names = {modules[n.target]: n.name for n in gm.graph.nodes if n.op == "call_module"}
    sums = {}
    watch = {}
    for g in groups:
        for node, callbacks in _hessian_norm_watchers(g, node_names, sums, sigma, probes, exact,
                                                      max_rows, generator).items():
            watch.setdefault(node, []).extend(callbacks)
    capture = _Capture(gm, watch)
    with torch.no_grad():
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            capture.run(_inputs(batch))
    return _reduce_mean(sums, [g.name for g in groups])


def mean_over_ranks(total: Tensor, count) -> Tensor:
    """total / count, with total and count summed over the ranks of torch.distributed first."""
    if dist.is_available() and dist.is_initialized():
        packed = torch.cat([total.double().flatten(),
                            total.new_tensor([count], dtype=torch.float64)])
        dist.all_reduce(packed)
        total, count = packed[:-1].to(total.dtype).reshape(total.shape), packed[-1].item()
    return total / count


def _reduce_mean(sums: dict, names: list[str]) -> dict:
    if not sums:
        raise ValueError("score: data held no batches")
    return {name: mean_over_ranks(*sums[name]) for name in names}


def _unit_parameters(group: UnitGroup):
    """(parameter, per_unit) pairs of a unit group: per_unit(t) sums a parameter-shaped tensor t
    to one value per unit (MATH.md §2.4: the unit's weight row, bias, BatchNorm entries; for a
    recurrent layer its rows in every gate block of both directions)."""
    m, units = group.module, group.units
    if isinstance(m, RECURRENT):
        chunks = m.weight_ih_l0.shape[0] // m.hidden_size
        suffixes = [f"_l{group.layer}"] + ([f"_l{group.layer}_reverse"] if m.bidirectional else [])
        for suffix in suffixes:
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                p = getattr(m, name + suffix, None)
                if p is not None:
                    yield p, lambda t: t.reshape(chunks, units, -1).sum((0, 2))
        return
    for owner in (m, group.batch_norm):
        if owner is None:
            continue
        for p in (owner.weight, owner.bias):
            if p is not None:
                yield p, lambda t: t.reshape(units, -1).sum(1)


def _per_unit(group: UnitGroup, elementwise: Callable[[Tensor], Tensor]) -> Tensor:
    return sum(per_unit(elementwise(p)) for p, per_unit in _unit_parameters(group))


def _magnitude(groups):
    with torch.no_grad():
        return {g.name: _per_unit(g, lambda p: p.pow(2)).sqrt() for g in groups}


def _loss_batches(model, data, loss, criterion, max_batches):
    if loss is None:
        raise ValueError(f"score: criterion {criterion!r} needs loss=(output, target) -> scalar")
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"score: criterion {criterion!r} needs (input, target) batches, got "
                             f"{type(batch).__name__}")
        yield loss(model(batch[0]), batch[1])


def _params(groups):
    return [p for g in groups for p, _ in _unit_parameters(g)]


def _taylor(model, groups, data, loss, max_batches):
    sums = {}
    params = _params(groups)
    for value in _loss_batches(model, data, loss, "taylor", max_batches):
        grads = dict(zip(map(id, params), torch.autograd.grad(value, params, allow_unused=True)))
        with torch.no_grad():
            for g in groups:
                contribution = sum(per_unit(_zero_if_none(grads[id(p)], p) * p)
                                   for p, per_unit in _unit_parameters(g)).pow(2)
                accumulate(sums, g.name, contribution, 1)
    return _reduce_mean(sums, [g.name for g in groups])


def _zero_if_none(grad, p):
    return torch.zeros_like(p) if grad is None else grad


def accumulate(sums, name, total, count):
    if name in sums:
        sums[name][0] += total
        sums[name][1] += count
    else:
        sums[name] = [total, count]


def _obd(model, groups, data, loss, probes, max_batches, generator):
    sums = {}
    params = _params(groups)
    for value in _loss_batches(model, data, loss, "obd", max_batches):
        grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        diag = {id(p): torch.zeros_like(p) for p in params}
        for _ in range(probes):
            vs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p, _ in used]
            try:
                hvs = torch.autograd.grad([g for _, g in used], [p for p, _ in used], vs,
                                          retain_graph=True, allow_unused=True)
            except RuntimeError as e:
                raise RuntimeError(
                    "score(criterion='obd') needs double backward through the model; the native "
                    "recurrent ops (GatedGRU/GatedLSTM) do not provide it: score those layers with "
                    f"another criterion ({e})") from e
            with torch.no_grad():
                for (p, _), v, hv in zip(used, vs, hvs):
                    if hv is not None:
                        diag[id(p)] += v * hv / probes
        with torch.no_grad():
            for g in groups:
                accumulate(sums, g.name, 0.5 * sum(per_unit(diag[id(p)] * p.pow(2))
                                                    for p, per_unit in _unit_parameters(g)), 1)
    return _reduce_mean(sums, [g.name for g in groups])


def score(model: nn.Module, data: Iterable | None = None, criterion: str = "hessian_norm", *,
          loss: Callable | None = None, sigma: float | None = None, probes: int = 32,
          exact: bool = False, max_batches: int | None = None, max_rows: int | None = 4096,
          generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """{unit group name: per-unit scores} for every prunable unit group of `model` (see
    scored_groups; names are module names, "<module>.l<k>" for layer k of a recurrent module).

    data: an iterable of batches, each an input tensor or an (input, target, ...) tuple
    (hessian_norm, taylor, obd; magnitude and random need none). Criteria (MATH.md §2):
      hessian_norm  E‖∇²f_k‖_F² of each unit's sub-mapping (layer + BatchNorm + activation) by the
                    fused closed-form ops; ReLU-family activations need `sigma` (smoothing);
                    recurrent layers by the probe estimator (`probes` pairs, at most `max_rows`
                    (step, sequence) rows per batch; zero initial state; `exact`: per-row
                    torch.func Hessians instead, for small layers)
      magnitude     ‖θ_k‖₂     taylor  E_batch (Σ g θ)²  (needs `loss(output, target)`)
      obd           ½ Σ diag(H) θ² with `probes` Rademacher probes (needs `loss`, double backward)
      random        uniform noise (a control)
    The model runs in its current mode: use eval() so BatchNorm uses its running statistics (the
    closed forms fold those). Under torch.distributed each rank passes its shard of the data and
    gets the scores of the whole."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    groups = scored_groups(model)
    if criterion == "magnitude":
        return _magnitude(groups)
    if criterion == "random":
        return {g.name: torch.rand(g.units, generator=generator) for g in groups}
    if data is None:
        raise ValueError(f"score: criterion {criterion!r} needs data")
    if criterion == "hessian_norm":
        return _hessian_norm(model, groups, data, sigma, probes, exact, max_rows, max_batches,
                             generator)
    if criterion == "taylor":
        return _taylor(model, groups, data, loss, max_batches)
    return _obd(model, groups, data, loss, probes, max_batches, generator)
