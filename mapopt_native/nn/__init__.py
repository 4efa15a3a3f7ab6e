"""Drop-in modules with selectable gates: GatedGRUCell, GatedLSTMCell, GatedGRU, GatedLSTM."""

from .cells import GatedGRUCell, GatedLSTMCell
from .layers import GatedGRU, GatedLSTM

__all__ = ["GatedGRUCell", "GatedLSTMCell", "GatedGRU", "GatedLSTM"]
