"""ImportanceTracker: hessian_norm scores accumulated during ordinary forward passes.

While active, the model runs a traced copy of its forward in which each scored group's activation
is replaced by the fused op activation_with_hessian_norm: it returns φ(z) (with φ' for backward)
and, in the same pass over z, adds the group's per-element Hessian-norm term into an accumulator.
Training or evaluation, the model computes what it computed before."""

import torch
from torch import Tensor, fx, nn

from .criteria import (accumulate, activation_site_term, curvature_scale, mean_over_ranks,
                       scored_groups)
from .graph import RECURRENT, UnitGroup, trace

_PIECEWISE_LINEAR = ("relu", "leaky_relu", "identity")


class _TrackedActivation(nn.Module):
    """One activation site: φ(z) for the model, the term of every group whose units it activates
    (one, or several when branches are added before it) into the tracker's sums."""

    def __init__(self, tracker: "ImportanceTracker", groups: list[UnitGroup]):
        super().__init__()
        self.tracker = [tracker]  # a list: not a submodule
        self.groups = groups

    def forward(self, z: Tensor) -> Tensor:
        tracker = self.tracker[0]
        out = None
        for group in self.groups:
            y, total, count = activation_site_term(group, z, tracker._scale(group), tracker.sigma)
            out = y if out is None else out
            accumulate(tracker._sums, group.name, total, count)
        return out


class _InputShape(nn.Module):
    """Passes a convolution's input through, noting its shape (the borders of s depend on it)."""

    def __init__(self, tracker: "ImportanceTracker", name: str):
        super().__init__()
        self.tracker, self.name = [tracker], name

    def forward(self, x: Tensor) -> Tensor:
        self.tracker[0]._input_shapes[self.name] = x.shape
        return x


class ImportanceTracker:
    """Accumulates the hessian_norm scores of `model`'s unit groups (Linear / Conv + BatchNorm +
    activation chains; recurrent layers need the estimator: see score) over every forward pass
    made while the tracker is active:

        tracker = ImportanceTracker(model, sigma=0.5)    # sigma: for ReLU-family activations
        with tracker:
            for x, y in loader: train_step(model, x, y)  # or evaluation passes
        scores = tracker.scores()                        # {group name: per-unit I_k}

    Scores use the weights of each pass (they move while training). BatchNorm is folded with its
    running statistics. Under torch.distributed scores() all-reduces the sums (every rank must
    call it). Functional dropout written as F.dropout(x, p, self.training) is traced with the mode
    at construction; nn.Dropout modules follow the model's mode."""

    def __init__(self, model: nn.Module, *, sigma: float | None = None):
        self.model = model
        self.sigma = sigma
        self.groups = [g for g in scored_groups(model)
                       if g.activation is not None and not isinstance(g.module, RECURRENT)]
        if sigma is None:
            needs = [g.name for g in self.groups if g.activation.name in _PIECEWISE_LINEAR]
            if needs:
                raise ValueError(
                    f"ImportanceTracker: {needs} end in a piecewise-linear activation whose exact "
                    "Hessian is zero almost everywhere; pass sigma > 0 to score their Gaussian-"
                    "smoothed mappings (MATH.md §2.2)")
        self._input_shapes: dict[str, torch.Size] = {}
        self._scales: dict[str, tuple] = {}
        self._gm = self._rewrite(trace(model))
        self.reset()

    def _rewrite(self, gm: fx.GraphModule) -> fx.GraphModule:
        sites = {}
        for g in self.groups:
            sites.setdefault(g.activation.site.name, []).append(g)
        convs = {g.name: g for g in self.groups if not isinstance(g.module, nn.Linear)}
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target in convs:
                target = f"_mapopt_shape_{node.name}"
                gm.add_submodule(target, _InputShape(self, node.target))
                with gm.graph.inserting_before(node):
                    noted = gm.graph.call_module(target, (node.args[0],))
                node.args = (noted,) + tuple(node.args[1:])
            if node.name not in sites:
                continue
            target = f"_mapopt_tracked_{node.name}"
            gm.add_submodule(target, _TrackedActivation(self, sites[node.name]))
            with gm.graph.inserting_after(node):
                tracked = gm.graph.call_module(target, (node.args[0],))
            node.replace_all_uses_with(tracked)
            gm.graph.erase_node(node)
        gm.recompile()
        return gm

    def _scale(self, group: UnitGroup) -> Tensor:
        """s of the group for the current weights, recomputed only when they changed."""
        params = [p for p in (group.module.weight, group.batch_norm and group.batch_norm.weight,
                              group.batch_norm and group.batch_norm.running_var) if p is not None]
        key = (tuple(p._version for p in params), self._input_shapes.get(group.name))
        cached = self._scales.get(group.name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, curvature_scale(group, self._input_shapes.get(group.name)))
            self._scales[group.name] = cached
        return cached[1]

    def reset(self) -> None:
        self._sums: dict[str, list] = {}

    def start(self) -> "ImportanceTracker":
        self.model.forward = self._gm.forward  # the instance attribute shadows the class's
        return self

    def stop(self) -> None:
        self.model.__dict__.pop("forward", None)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def scores(self) -> dict[str, Tensor]:
        """{group name: mean per-unit I_k over every sample seen since the last reset()}."""
        out = {}
        for g in self.groups:
            if g.name not in self._sums:
                raise RuntimeError(f"ImportanceTracker: no forward pass reached {g.name!r} while "
                                   "the tracker was active")
            out[g.name] = mean_over_ranks(*self._sums[g.name])
        return out
