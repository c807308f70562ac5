"""`ActivationCache` for this model on both transformer-lens 3.9 and 4.x.

4.x's `ActivationCache` multiplies per-head results by each attention module's
`_result_contribution_scale` (this model's `attn_out_scale`); 3.9's multiplies `z` by `W_O` only,
which is 1/attn_out_scale too large for the published checkpoints (scale 1/sqrt(2 n_layers)).
On 3.9 a thin subclass applies the scale; everything else is TransformerLens's own code.
"""

from __future__ import annotations

from typing import Any

from transformer_lens import ActivationCache

# 4.x computes head results in `_ensure_head_results`, which already applies the scale.
_SCALES_HEAD_RESULTS = hasattr(ActivationCache, "_ensure_head_results")


class ScaledHeadResultsCache(ActivationCache):
    """transformer-lens 3.9: per-head results times each layer's attention-output scale."""

    def compute_head_results(self) -> None:
        computed = "blocks.0.attn.hook_result" not in self.cache_dict
        super().compute_head_results()
        if not computed:
            return  # recorded by attn.hook_result, which already includes the scale
        for layer, block in enumerate(self.model.blocks):
            scale = getattr(block.attn, "_result_contribution_scale", 1.0)
            if scale != 1.0:
                key = f"blocks.{layer}.attn.hook_result"
                self.cache_dict[key] = self.cache_dict[key] * scale


def make_activation_cache(cache_dict: dict, model: Any, has_batch_dim: bool = True) -> ActivationCache:
    """An `ActivationCache` whose helpers are right for `model` on the installed transformer-lens."""
    if _SCALES_HEAD_RESULTS or model.cfg.attn_out_scale == 1.0:
        return ActivationCache(cache_dict, model, has_batch_dim=has_batch_dim)
    return ScaledHeadResultsCache(cache_dict, model, has_batch_dim=has_batch_dim)
