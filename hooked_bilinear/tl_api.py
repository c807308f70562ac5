"""TransformerLens's everyday model methods that are not the forward pass: optional hook points
(`set_use_*`), parameter counts, composition scores, head labels and the loss.

Names, arguments and defaults are TransformerLens 3.9's `HookedTransformer`'s.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.utilities.matrix import composition_scores  # in 3.9 and 4.x


class HookDisabledError(ValueError, AssertionError):
    """A hook was added to a point that does not fire under the current settings.

    Also an AssertionError because TransformerLens raises one here."""


# hook name suffix -> (config flag, the method that turns it on)
_OPTIONAL_HOOKS = {
    "attn.hook_result": ("use_attn_result", "set_use_attn_result"),
    "hook_q_input": ("use_split_qkv_input", "set_use_split_qkv_input"),
    "hook_k_input": ("use_split_qkv_input", "set_use_split_qkv_input"),
    "hook_v_input": ("use_split_qkv_input", "set_use_split_qkv_input"),
    "hook_mlp_in": ("use_hook_mlp_in", "set_use_hook_mlp_in"),
    "hook_attn_in": ("use_attn_in", "set_use_attn_in"),
}


class TransformerLensAPIMixin:
    """Mixed into the model; expects `cfg` and `blocks`, and the stacked views `QK`, `OV`."""

    # --- optional hook points ---------------------------------------------------------------

    def check_hooks_to_add(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False, prepend=False):
        """Called by HookedRootModule before adding a hook: refuse hooks that would never fire."""
        for suffix, (flag, setter) in _OPTIONAL_HOOKS.items():
            if hook_point_name.endswith(suffix) and not getattr(self.cfg, flag):
                raise HookDisabledError(
                    f"{hook_point_name} does not fire while cfg.{flag} is False; call model.{setter}(True) first"
                )

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's output separately (`attn.hook_result` [batch, pos, n_heads, d_model]);
        costs n_heads times the attention output's memory."""
        self.cfg.use_attn_result = use_attn_result

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own copy of the residual for Q, K and V (`hook_q_input`,
        `hook_k_input`, `hook_v_input`, [batch, pos, heads, d_model]) so each can be patched."""
        self.cfg.use_split_qkv_input = use_split_qkv_input

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Give each head its own copy of the residual (`hook_attn_in`, [batch, pos, n_heads, d_model])."""
        if use_attn_in and self.cfg.n_key_value_heads != self.cfg.n_heads:
            raise ValueError(
                "use_attn_in does not work with grouped-query attention (keys/values are shared across heads); "
                "use set_use_split_qkv_input(True) instead"
            )
        self.cfg.use_attn_in = use_attn_in

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Expose the residual the MLP's norm reads (`hook_mlp_in`, [batch, pos, d_model])."""
        if use_hook_mlp_in and self.cfg.attn_only:
            raise ValueError("this model is attn_only: it has no MLP input to hook")
        self.cfg.use_hook_mlp_in = use_hook_mlp_in

    def set_ungroup_grouped_query_attention(self, ungroup_grouped_query_attention: bool) -> None:
        """Under grouped-query attention, give hook_k/hook_v (and the split inputs) n_heads heads,
        the shared keys/values repeated, so each query head's keys can be patched on their own."""
        self.cfg.ungroup_grouped_query_attention = ungroup_grouped_query_attention

    # --- counts, labels, scores ------------------------------------------------------------

    @property
    def n_params_total(self) -> int:
        """Every parameter (embeddings, biases and norm gains included), as `sum(p.numel())`."""
        return sum(p.numel() for p in self.parameters())

    def all_head_labels(self) -> list[str]:
        """["L0H0", "L0H1", ...] in layer-major order."""
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def all_composition_scores(self, mode: str) -> Tensor:
        """Q-, K- or V-composition scores of every head pair: [n_layers, n_heads, n_layers, n_heads],
        zero unless the second head's layer is later than the first's ("mathematical framework")."""
        left = self.OV
        if mode == "Q":
            right = self.QK
        elif mode == "K":
            right = self.QK.T
        elif mode == "V":
            right = self.OV
        else:
            raise ValueError(f"mode must be one of 'Q', 'K', 'V', not {mode!r}")
        scores = composition_scores(left, right, broadcast_dims=True)
        layers = torch.arange(self.cfg.n_layers, device=scores.device)
        later = layers[:, None, None, None] < layers[None, None, :, None]
        return torch.where(later, scores, torch.zeros_like(scores))

    # --- loss ------------------------------------------------------------------------------

    def loss_fn(
        self, logits: Tensor, tokens: Tensor, attention_mask: Optional[Tensor] = None, per_token: bool = False
    ) -> Tensor:
        """Next-token cross-entropy. logits [batch, pos, d_vocab], tokens [batch, pos] -> a scalar,
        or [batch, pos - 1] with `per_token`. With an attention mask [batch, pos], predictions whose
        target (or input) is padding are left out of the mean and are zero per token."""
        # cross_entropy fuses log-softmax and the gather, which matters for backward at large vocabularies.
        targets = tokens[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
        nll = nll.view_as(targets)
        if attention_mask is None:
            return nll if per_token else nll.mean()
        attention_mask = attention_mask.to(nll.device)
        keep = attention_mask[:, 1:].to(nll.dtype) * attention_mask[:, :-1].to(nll.dtype)
        if per_token:
            return nll * keep
        return (nll * keep).sum() / keep.sum().clamp(min=1)
