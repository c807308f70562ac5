"""SAELens's SAE splicing on this model: `add_sae`, `run_with_saes`, `run_with_cache_with_saes`,
`run_with_hooks_with_saes`, `saes()`, `reset_saes` (needs the `[sae]` extra: sae-lens, which
requires transformer-lens < 4).

The methods are SAELens's own (`sae_lens.HookedSAETransformer`'s), not re-implementations: they
only need the hooked-model surface this class shares with TransformerLens (`hook_dict`,
`mod_dict`, `setup`, `run_with_cache`, `run_with_hooks`, `to_tokens`, `tokenizer`), so an SAE
trained on a hook of this model (e.g. with `LanguageModelSAETrainingRunner(cfg, override_model=model)`)
splices in exactly as into a TransformerLens model.

    model = HookedSAEBilinearTransformer.from_model(model)   # same weights, no copy
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
"""

from __future__ import annotations

from typing import Any

try:
    from sae_lens.analysis.hooked_sae_transformer import HookedSAETransformer, add_hook_in_to_mlp
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"hooked_bilinear.sae needs sae-lens ({error}); install it with pip install 'hooked-bilinear[sae]' "
        "(sae-lens requires transformer-lens < 4, so this pins transformer-lens 3.9)"
    ) from error

from .model import HookedBilinearTransformer

# SAELens's splicing methods, taken from its class so the semantics are exactly SAELens's.
_SAE_METHODS = (
    "acts_to_saes", "add_sae", "_reset_sae", "reset_saes", "_compute_exclusion_mask", "_token_masks",
    "run_with_saes", "run_with_cache_with_saes", "run_with_hooks_with_saes", "saes",
)


class HookedSAEBilinearTransformer(HookedBilinearTransformer):
    """`HookedBilinearTransformer` plus SAELens's `HookedSAETransformer` methods."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_sae_state()

    def _init_sae_state(self) -> None:
        # As HookedSAETransformer.__init__: an `mlp.hook_in` for transcoders, and empty SAE registries.
        for block in self.blocks:
            if hasattr(block, "mlp") and not hasattr(block.mlp, "hook_in"):
                add_hook_in_to_mlp(block.mlp)
        self._acts_to_saes = {}
        self._transcoder_output_hooks = {}
        self.setup()

    @classmethod
    def from_model(cls, model: HookedBilinearTransformer) -> "HookedSAEBilinearTransformer":
        """Give an existing model SAELens's methods in place (same parameters, no copy)."""
        if not isinstance(model, HookedBilinearTransformer):
            raise TypeError(f"from_model takes a HookedBilinearTransformer, got {type(model).__name__}")
        model.__class__ = cls
        model._init_sae_state()
        return model

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        # SAELens masks special tokens (exclude_special_tokens) around each forward pass.
        with self._token_masks(input, kwargs):
            return super().forward(input, *args, **kwargs)


for _name in _SAE_METHODS:
    setattr(HookedSAEBilinearTransformer, _name, HookedSAETransformer.__dict__[_name])
del _name
