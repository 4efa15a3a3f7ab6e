"""Hessian-norm importance for pruning (MATH.md §2)."""

from .estimator import Estimate, hessian_norm, recurrent_hessian_norm
from .graph import UnitGroup, unit_groups
