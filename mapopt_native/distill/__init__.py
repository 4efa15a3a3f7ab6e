"""Knowledge distillation (MATH.md §3): the fused kd_loss and mapping_distance ops, and the
Distiller training helper."""

from ..ops.distill import DISTANCES, REDUCTIONS, kd_loss, mapping_distance
from .trainer import Distiller, accuracy

__all__ = ["DISTANCES", "REDUCTIONS", "Distiller", "accuracy", "kd_loss", "mapping_distance"]
