"""Pruning by surgery (MATH.md §2.5): the lowest-scoring units of a model are physically removed.

A unit is an output row of a producer (graph.UnitGroup). Removing it takes, from the model:
the producer's weight row and bias entry (a Conv's output channel), the matching BatchNorm entries,
and each consumer's matching input columns; for a recurrent layer, hidden unit j in every gate
block of W_ih, W_hh and the biases (rows g*H + j), column j of W_hh, in both directions, and the
next layer's (or the consumers') input columns j and H + j (bidirectional outputs).

How many units go:
- scope="layer": k = floor(amount * units) per group, the k lowest-scored.
- scope="global": each group's scores are divided by their mean absolute value, then the lowest
  of all units across groups go until floor(amount * total units) are removed. The mean, not the
  sum: dividing by the sum makes a unit of a wide layer look less important only because the layer
  is wide (its normalised scores average 1/units), so wide layers would be over-pruned; after
  dividing by the mean an average unit scores 1 in every layer, whatever its width.
Each group keeps at least `min_units`. Ties go to the lower index.

Recurrent modules: torch's nn.GRU / nn.LSTM have one hidden_size for all layers, so every layer of
a recurrent module (ours too, for consistency) loses the same number of units, each layer its own
lowest-scored ones. In global scope a module's layers are ranked together: removing one more unit
from each of its L layers competes with the other units at the mean of those layers' next
normalised scores and counts as L units (the total may then stop up to L - 1 units short). If one
layer can't be pruned (coupled, no score), the whole module is left alone."""

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .graph import RECURRENT, UnitGroup, unit_groups

SCOPES = ("layer", "global")
_CONVS = (nn.Conv1d, nn.Conv2d)


@dataclass
class GroupChange:
    removed: list[int]   # the removed units' indices before pruning, ascending
    before: int
    after: int


@dataclass
class PruneReport:
    groups: dict[str, GroupChange] = field(default_factory=dict)  # every group that was eligible
    skipped: dict[str, str] = field(default_factory=dict)         # group name -> why it was left

    @property
    def total_removed(self) -> int:
        return sum(len(c.removed) for c in self.groups.values())


def _check_amount(amount) -> None:
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0 <= amount < 1:
        raise ValueError(f"amount must be a fraction in [0, 1), got {amount!r}")


def prune_units(model: nn.Module, scores: Mapping, amount: float, *, scope: str = "layer",
                min_units: int = 1) -> PruneReport:
    """Removes the lowest-scoring units of `model` IN PLACE (see the module docstring for which
    and how many) and returns a PruneReport.

    scores: {group name: tensor of one score per unit} (prune.criteria.score's output; keys as
    graph.UnitGroup.name). Groups that are coupled (graph.py), that this surgery can't handle
    (grouped convolutions, LSTM proj_size) or that have no score are left alone and listed in
    report.skipped with the reason. amount=0 leaves the model untouched.

    The pruned parameters are new nn.Parameter objects (requires_grad kept, .grad dropped): build
    optimizers (and anything else holding parameters) after pruning."""
    _check_amount(amount)
    return _prune(model, scores, scope, min_units, lambda units, key: math.floor(amount * units))


def _prune(model: nn.Module, scores: Mapping, scope: str, min_units: int,
           target: Callable[[int, str | None], int]) -> PruneReport:
    """prune_units with the number to remove given by target(units, key): per bundle in layer
    scope (key: its first group's name), over all eligible units in global scope (key: None)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(min_units, bool) or not isinstance(min_units, int) or min_units < 1:
        raise ValueError(f"min_units must be an integer >= 1, got {min_units!r}")
    groups = unit_groups(model)
    scores = _checked_scores(groups, scores)
    report = PruneReport()
    bundles = []
    for bundle in _bundles(groups):
        reasons = {g.name: g.coupled or _refusal(g) or (
            None if g.name in scores else "no score given") for g in bundle}
        bad = next((name for name, why in reasons.items() if why), None)
        if bad is None:
            bundles.append(bundle)
            continue
        for g in bundle:
            report.skipped[g.name] = reasons[g.name] or (
                f"layer {bad!r} of the same module can't be pruned ({reasons[bad]}), and all "
                "layers of a recurrent module keep one hidden_size")
    counts = _counts(bundles, scores, scope, min_units, target)
    for bundle, k in zip(bundles, counts):
        units = bundle[0].units
        for g in bundle:
            removed = torch.sort(scores[g.name], stable=True).indices[:k].sort().values
            report.groups[g.name] = GroupChange(removed.tolist(), units, units - k)
            if k:
                keep = torch.ones(units, dtype=torch.bool)
                keep[removed] = False
                _remove(g, keep.nonzero().flatten(), units)
        if k:
            _finish(bundle[0].module)
    return report


def _checked_scores(groups: list[UnitGroup], scores) -> dict[str, Tensor]:
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping {{group name: per-unit scores}}, got "
                        f"{type(scores).__name__}")
    names = [g.name for g in groups]
    unknown = [k for k in scores if k not in names]
    if unknown:
        raise ValueError(f"scores has keys that are not unit groups of the model: {unknown}; the "
                         f"groups are {names}")
    out = {}
    for g in groups:
        if g.name not in scores:
            continue
        s = torch.as_tensor(scores[g.name]).detach().to("cpu", torch.float64)
        if s.shape != (g.units,):
            raise ValueError(f"scores[{g.name!r}] has shape {list(s.shape)}, but group {g.name!r} "
                             f"has {g.units} units: expected shape [{g.units}]")
        if not torch.isfinite(s).all():
            raise ValueError(f"scores[{g.name!r}] has non-finite values")
        out[g.name] = s
    return out


def _bundles(groups: list[UnitGroup]) -> list[list[UnitGroup]]:
    """Groups pruned together: all layers of one recurrent module, or one group alone."""
    by_module = {}
    for g in groups:
        key = id(g.module) if isinstance(g.module, RECURRENT) else id(g)
        by_module.setdefault(key, []).append(g)
    return list(by_module.values())


def _refusal(g: UnitGroup) -> str | None:
    """Why this surgery can't remove the group's units, or None."""
    m = g.module
    if isinstance(m, _CONVS) and m.groups != 1:
        return (f"it is a grouped convolution (groups={m.groups}): its output channels are tied "
                "to its groups")
    if getattr(m, "proj_size", 0):
        return "it is an LSTM with proj_size > 0"
    for name, c in g.consumers:
        if c is m:  # the next layer of the same recurrent module
            continue
        if isinstance(c, _CONVS) and c.groups != 1:
            return f"its consumer {name!r} is a grouped convolution (groups={c.groups})"
        width = _input_width(c)
        fits = width % g.units == 0  # the units repeat along the read axis (directions, time)
        if isinstance(c, _CONVS) or isinstance(m, _CONVS) and not g.flattened:
            fits = width == g.units  # channels in, or pooled and squeezed channels
        if not fits:
            return (f"its consumer {name!r} reads {width} input features, which don't map onto "
                    f"its {g.units} units")
    return None


def _input_width(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    return m.in_channels if isinstance(m, _CONVS) else m.input_size


def _counts(bundles, scores, scope, min_units, target) -> list[int]:
    """How many units each bundle loses (the same number in each of its groups)."""
    limits = [max(b[0].units - min_units, 0) for b in bundles]
    if scope == "layer":
        return [min(max(target(b[0].units, b[0].name), 0), limit)
                for b, limit in zip(bundles, limits)]
    # One candidate per (bundle, r): removing each of its groups' r-th lowest unit.
    candidates = []
    for i, (bundle, limit) in enumerate(zip(bundles, limits)):
        ranked = []
        for g in bundle:
            s = scores[g.name]
            scale = s.abs().mean()
            ranked.append(torch.sort(s / scale if scale > 0 else s).values)
        mean = torch.stack(ranked).mean(0)
        candidates += [(float(mean[r]), i, r) for r in range(limit)]
    total = sum(b[0].units * len(b) for b in bundles)
    budget = max(target(total, None), 0)
    counts, closed = [0] * len(bundles), set()
    for _, i, _ in sorted(candidates):
        weight = len(bundles[i])
        if i in closed or weight > budget:
            closed.add(i)  # a bundle loses its lowest units first: skipping one ends it
            continue
        counts[i] += 1
        budget -= weight
    return counts


def _replace(module: nn.Module, name: str, dim: int, index: Tensor) -> None:
    """Keeps the entries `index` of module.<name> (a parameter or buffer) along `dim`, as a new
    Parameter (requires_grad kept) or buffer."""
    old = getattr(module, name, None)
    if old is None:
        return
    new = old.detach().index_select(dim, index.to(old.device))
    setattr(module, name, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter)
            else new)


def _spread(keep: Tensor, units: int, width: int, unit_major: bool) -> Tensor:
    """The indices, along an axis of `width` = r * units entries, that belong to the kept units:
    unit-major (flattened conv channels: unit c owns c*r .. c*r + r-1) or unit-minor (unit j owns
    j, units + j, ...: gate blocks, directions, flattened time steps of a last-axis feature)."""
    r = torch.arange(width // units)
    return (keep[:, None] * len(r) + r if unit_major else r[:, None] * units + keep).flatten()


def _recurrent_names(m: nn.Module, layer: int, kinds: tuple) -> list[str]:
    """Parameter names of `layer` in both directions (torch's names, shared by GatedGRU/LSTM)."""
    kinds = [k for k in kinds if m.bias or not k.startswith("bias")]
    return [f"{k}_l{layer}{'_reverse' if d else ''}"
            for d in range(2 if m.bidirectional else 1) for k in kinds]


def _remove(g: UnitGroup, keep: Tensor, units: int) -> None:
    """Removes the units of `g` not in `keep` from its producer, BatchNorm and consumers; the
    producer's size attributes are set by _finish for recurrent modules."""
    m = g.module
    if isinstance(m, RECURRENT):
        names = _recurrent_names(m, g.layer, ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        rows = _spread(keep, units, getattr(m, names[0]).shape[0], unit_major=False)  # gate blocks
        for name in names:
            _replace(m, name, 0, rows)
        for name in _recurrent_names(m, g.layer, ("weight_hh",)):
            _replace(m, name, 1, keep)
    else:
        _replace(m, "weight", 0, keep)
        _replace(m, "bias", 0, keep)
        setattr(m, "out_features" if isinstance(m, nn.Linear) else "out_channels", len(keep))
    if g.batch_norm is not None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            _replace(g.batch_norm, name, 0, keep)
        g.batch_norm.num_features = len(keep)
    unit_major = isinstance(m, _CONVS)
    for _, c in g.consumers:
        if isinstance(c, RECURRENT):
            layer = g.layer + 1 if c is m else 0
            names = _recurrent_names(c, layer, ("weight_ih",))
            cols = _spread(keep, units, getattr(c, names[0]).shape[1], unit_major=False)
            for name in names:
                _replace(c, name, 1, cols)
            if layer == 0:
                c.input_size = len(cols)
                _finish(c)
        else:
            _replace(c, "weight", 1, _spread(keep, units, c.weight.shape[1], unit_major))
            setattr(c, "in_features" if isinstance(c, nn.Linear) else "in_channels",
                    c.weight.shape[1])


def _finish(m: nn.Module) -> None:
    """Size attributes and torch's flat-weight list of a recurrent module after surgery."""
    if not isinstance(m, RECURRENT):
        return
    m.hidden_size = m.weight_hh_l0.shape[1]
    if isinstance(m, nn.RNNBase):
        m._init_flat_weights()  # its list of weights (and cuDNN's flat buffer on CUDA)
