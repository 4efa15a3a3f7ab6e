"""The Hessian-norm criterion as an importance for Torch-Pruning's pruners (optional dependency:
`pip install torch-pruning`).

    import torch_pruning as tp
    from mapopt_native.prune.torch_pruning import HessianNormImportance

    imp = HessianNormImportance(model, calibration_batches, sigma=0.5)
    pruner = tp.pruner.BasePruner(model, example_inputs, importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    pruner.step()

Torch-Pruning finds the coupled channels (a residual add ties every branch's channels
together); this importance gives each group member that produces the channels (a Linear or
Conv's output) its per-unit I_k from mapopt_native.prune.score, and sums them over the group.
Scores are recomputed whenever the model's layer shapes change (after each pruning step)."""

import torch
from torch import Tensor, nn

try:
    import torch_pruning as tp
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("mapopt_native.prune.torch_pruning needs Torch-Pruning: "
                      "pip install torch-pruning") from e

from .criteria import score

_OUTPUT_PRUNING = (tp.pruner.function.prune_conv_out_channels,
                   tp.pruner.function.prune_linear_out_channels)


class HessianNormImportance(tp.importance.Importance):
    """Per-channel E‖∇²f_c‖_F² (MATH.md §2) of the channels of a Torch-Pruning group.

    model, data: the model being pruned and an iterable of calibration batches (tensors or
    (input, target) tuples), re-iterated at each re-scoring; sigma: smoothing for ReLU-family
    activations; normalizer: None, "sum", "mean" or "max" per group (what makes groups of
    different layers comparable under global pruning); other options go to score()."""

    def __init__(self, model: nn.Module, data, *, sigma: float | None = None,
                 normalizer: str | None = "mean", **options):
        if normalizer not in (None, "sum", "mean", "max"):
            raise ValueError(f"normalizer must be None, 'sum', 'mean' or 'max', got {normalizer!r}")
        self.model, self.data, self.sigma = model, data, sigma
        self.normalizer, self.options = normalizer, options
        self._shapes = None
        self._by_module: dict[nn.Module, Tensor] = {}

    def _fingerprint(self):
        return tuple(tuple(p.shape) for p in self.model.parameters())

    def _scores(self) -> dict:
        if self._shapes != self._fingerprint():
            was_training = self.model.training
            self.model.eval()
            try:
                scores = score(self.model, self.data, "hessian_norm", sigma=self.sigma,
                               **self.options)
            finally:
                self.model.train(was_training)
            modules = dict(self.model.named_modules())
            self._by_module = {modules[name]: s for name, s in scores.items() if name in modules}
            self._shapes = self._fingerprint()
        return self._by_module

    @torch.no_grad()
    def __call__(self, group) -> Tensor | None:
        by_module = self._scores()
        total = None
        for i, (dep, idxs) in enumerate(group):
            scores = by_module.get(dep.layer)
            if dep.pruning_fn not in _OUTPUT_PRUNING or scores is None:
                continue
            root = group[i].root_idxs
            if any(r is None for r in root):
                continue
            local = scores[idxs].float()
            if total is None:
                total = torch.zeros(len(group[0].idxs), device=local.device)
            total.scatter_add_(0, torch.tensor(root, device=local.device), local)
        if total is None:
            return None  # nothing in the group that we score: Torch-Pruning skips the group
        if self.normalizer == "sum":
            total = total / total.sum().clamp_min(torch.finfo(total.dtype).tiny)
        elif self.normalizer == "mean":
            total = total / total.mean().clamp_min(torch.finfo(total.dtype).tiny)
        elif self.normalizer == "max":
            total = total / total.max().clamp_min(torch.finfo(total.dtype).tiny)
        return total
