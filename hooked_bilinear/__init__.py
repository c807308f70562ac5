"""hooked_bilinear: a hooked transformer with bilinear MLPs and the classic TransformerLens API."""

from .config import HookedBilinearConfig
from .kv_cache import KVCache
from .model import HookedBilinearTransformer

__all__ = ["HookedBilinearConfig", "HookedBilinearTransformer", "KVCache"]
__version__ = "0.1.0"
