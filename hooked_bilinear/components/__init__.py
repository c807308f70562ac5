"""The model's parts, one per module."""

from .attention import Attention, LayerKVCache
from .block import TransformerBlock
from .embed import Embed, PosEmbed, Unembed
from .mlp import GatedMLP, gate_activation
from .norm import Norm, NoNorm, make_norm
from .rotary import Rotary

__all__ = [
    "Attention", "LayerKVCache", "TransformerBlock", "Embed", "PosEmbed", "Unembed",
    "GatedMLP", "gate_activation", "Norm", "NoNorm", "make_norm", "Rotary",
]
