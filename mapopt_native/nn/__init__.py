"""Drop-in modules with selectable gates: GatedGRUCell, GatedLSTMCell."""

from .cells import GatedGRUCell, GatedLSTMCell

__all__ = ["GatedGRUCell", "GatedLSTMCell"]
