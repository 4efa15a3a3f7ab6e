"""Retraining after pruning (MATH.md §2.5), optionally distilling from the unpruned model (§3),
and iterative pruning schedules."""

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .surgery import PruneReport, _check_amount, _prune


def finetune(model: nn.Module, data: Iterable, loss: Callable, epochs: int = 1, *,
             optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
             teacher: nn.Module | None = None, alpha: float = 0.5, distance: str = "l2",
             temperature: float = 1.0, device=None, progress: bool = True) -> list[float]:
    """Trains `model` (in train mode) on `data`, an iterable of (input, target) batches, re-iterated
    each epoch (a list or a DataLoader, not a generator). Returns the mean loss of each epoch.

    Without a teacher the objective is loss(model(input), target). With one (the unpruned model:
    run in eval mode under no_grad, never updated) training is mapopt_native.distill.Distiller's:
    kd_loss(output, teacher(input), target, alpha, distance=distance, temperature=temperature) =
    (1 - alpha) CE + alpha D (MATH.md §3), a classification objective: `loss` is then unused.

    optimizer: default Adam(model.parameters(), lr). It must hold the model's current parameters:
    one built before prune_units holds the removed ones. device: where model, teacher and batches
    go (default: the model's device)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if device is not None:
        model.to(device)
    params = list(model.parameters())
    device = params[0].device if params else torch.device(device or "cpu")
    if optimizer is None:
        optimizer = torch.optim.Adam(params, lr=lr)
    else:
        ids = {id(p) for p in params}
        if any(id(p) not in ids for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("optimizer holds parameters that are not the model's (built before "
                             "pruning?): build it after prune_units, or pass optimizer=None")
    if teacher is not None:
        if teacher is model:
            raise ValueError("teacher must be another model (the unpruned copy), not `model`")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        from ..distill import Distiller  # another capability: loaded only when distilling
        distiller = Distiller(teacher, model, alpha=alpha, distance=distance,
                              temperature=temperature)
        return distiller.fit(data, epochs, optimizer, device=device, amp=False,
                             progress=progress)["loss"]

    model.train()
    history = []
    for epoch in range(epochs):
        total, batches = 0.0, 0
        bar = tqdm(data, desc=f"finetune {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for input, target in bar:
            input, target = _to(input, device), _to(target, device)
            value = loss(model(input), target)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total += value.item()
            batches += 1
            bar.set_postfix(loss=f"{total / batches:.4g}")
        if batches == 0:
            raise ValueError(f"data yielded no batches in epoch {epoch + 1}: pass a re-iterable "
                             "(a list or a DataLoader), not a generator or an empty iterable")
        history.append(total / batches)
    return history


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    return type(x)(_to(v, device) for v in x) if isinstance(x, (tuple, list)) else x


@dataclass
class IterativeResult:
    reports: list[PruneReport] = field(default_factory=list)    # one per step
    histories: list[list[float]] = field(default_factory=list)  # finetune's, one per step


def prune_iteratively(model: nn.Module, data: Iterable, loss: Callable, *, amount: float,
                      steps: int, scorer: Callable[[nn.Module], Mapping], finetune_epochs: int = 1,
                      scope: str = "layer", teacher: nn.Module | None = None, min_units: int = 1,
                      **finetune_options) -> IterativeResult:
    """Prunes `model` IN PLACE in `steps` rounds of score (scorer(model) -> scores dict, re-run
    each round on the current model), prune_units, finetune(finetune_epochs; none if 0).

    Geometric schedule: each round removes the fraction 1 - (1 - amount)^(1/steps) of the units
    left, so that after round s a fraction 1 - (1 - amount)^(s/steps) of the original units is
    gone. The counts are rounded against the original sizes (per group in layer scope, the total
    in global scope), so the final sizes are exactly those of one-shot
    prune_units(amount=amount), not the compounding of per-round floors.

    finetune_options go to finetune (lr, alpha, distance, temperature, device, progress); each
    round gets a fresh optimizer since pruning replaces the parameters."""
    _check_amount(amount)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, numbers.Integral) \
            or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
    if "optimizer" in finetune_options:
        raise TypeError("prune_iteratively builds a fresh optimizer each round (pruning replaces "
                        "the parameters): pass lr, not optimizer")
    original = {}  # units before the first round, per target key

    def target(units, key, gone):
        start = original.setdefault(key, units)
        return units - (start - math.floor(gone * start))

    result = IterativeResult()
    for step in range(1, steps + 1):
        gone = amount if step == steps else 1 - (1 - amount) ** (step / steps)
        report = _prune(model, scorer(model), scope, min_units,
                        lambda units, key: target(units, key, gone))
        result.reports.append(report)
        result.histories.append(
            finetune(model, data, loss, finetune_epochs, teacher=teacher, **finetune_options)
            if finetune_epochs else [])
    return result
