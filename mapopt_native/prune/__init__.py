"""Hessian-norm importance for pruning (MATH.md §2): scores, physical pruning, retraining.

    scores = score(model.eval(), calibration_batches)   # {unit group: per-unit E‖∇²f_k‖_F²}
    report = prune_units(model, scores, amount=0.3)     # in place; report.groups / .skipped
    finetune(model, train_batches, loss, epochs=2, teacher=unpruned_copy)

The fused closed-form ops (hessian_norm_linear / conv1d / conv2d, activation_with_hessian_norm,
fold_batch_norm) live in mapopt_native.ops and are re-exported here; hessian_norm() estimates any
sub-mapping; ImportanceTracker scores during ordinary forward passes; prune_iteratively runs
score -> prune -> fine-tune schedules; mapopt_native.prune.torch_pruning plugs the criterion into
Torch-Pruning."""

from ..ops.hessian_norm import (activation_with_hessian_norm, fold_batch_norm,
                                hessian_norm_conv1d, hessian_norm_conv2d, hessian_norm_linear)
from .criteria import CRITERIA, score, scored_groups
from .estimator import Estimate, hessian_norm, recurrent_hessian_norm
from .finetune import IterativeResult, finetune, prune_iteratively
from .graph import UnitGroup, unit_groups
from .surgery import GroupChange, PruneReport, prune_units
from .tracker import ImportanceTracker

__all__ = ["CRITERIA", "Estimate", "GroupChange", "ImportanceTracker", "IterativeResult",
           "PruneReport", "UnitGroup", "activation_with_hessian_norm", "finetune",
           "fold_batch_norm", "hessian_norm", "hessian_norm_conv1d", "hessian_norm_conv2d",
           "hessian_norm_linear", "prune_iteratively", "prune_units", "recurrent_hessian_norm",
           "score", "scored_groups", "unit_groups"]
