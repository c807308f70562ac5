"""Stacked weight views with TransformerLens's names and shapes.

These are views for analysis: per-layer parameters stacked along a leading `n_layers` axis, with
grouped-query keys/values repeated per head. The attention-output scale (`cfg.attn_out_scale`) is
folded into `W_O`/`b_O`/`OV` here, so every view is what the residual stream actually receives.
Absent biases read as zeros, so analysis code needs no special cases.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from transformer_lens import FactoredMatrix


class WeightViewsMixin:
    """Mixed into the model; expects `cfg`, `embed`, `blocks` and `unembed`."""

    def _stack(self, get: Callable[[object], Optional[Tensor]], shape: tuple[int, ...]) -> Tensor:
        tensors = []
        for block in self.blocks:
            t = get(block)
            tensors.append(torch.zeros(shape, dtype=self.cfg.dtype, device=self.W_E.device) if t is None else t)
        return torch.stack(tensors, dim=0)

    # --- embeddings -----------------------------------------------------------------------
    @property
    def W_E(self) -> Tensor:
        """[d_vocab, d_model]"""
        return self.embed.W_E

    @property
    def W_pos(self) -> Tensor:
        """[n_ctx, d_model]; only for learned positional embeddings."""
        if self.pos_embed is None:
            raise AttributeError("W_pos exists only with positional_embedding_type='standard'; this model is rotary")
        return self.pos_embed.W_pos

    @property
    def W_E_pos(self) -> Tensor:
        """[d_vocab + n_ctx, d_model]: token and position embeddings stacked (a basis of the input space)."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_U(self) -> Tensor:
        """[d_model, d_vocab]"""
        return self.unembed.W_U

    @property
    def b_U(self) -> Tensor:
        """[d_vocab]"""
        b = self.unembed.b_U
        return torch.zeros(self.cfg.d_vocab, dtype=self.cfg.dtype, device=self.W_E.device) if b is None else b

    # --- attention ------------------------------------------------------------------------
    @property
    def W_Q(self) -> Tensor:
        """[n_layers, n_heads, d_model, d_head]"""
        return torch.stack([b.attn.W_Q for b in self.blocks])

    @property
    def W_K(self) -> Tensor:
        """[n_layers, n_heads, d_model, d_head] (shared heads repeated under grouped-query attention)"""
        return torch.stack([b.attn.W_K for b in self.blocks])

    @property
    def W_V(self) -> Tensor:
        """[n_layers, n_heads, d_model, d_head]"""
        return torch.stack([b.attn.W_V for b in self.blocks])

    @property
    def W_O(self) -> Tensor:
        """[n_layers, n_heads, d_head, d_model], attention-output scale included"""
        return torch.stack([b.attn.W_O * self.cfg.attn_out_scale for b in self.blocks])

    @property
    def b_Q(self) -> Tensor:
        """[n_layers, n_heads, d_head]"""
        return self._stack(lambda b: b.attn.b_Q, (self.cfg.n_heads, self.cfg.d_head))

    @property
    def b_K(self) -> Tensor:
        """[n_layers, n_heads, d_head]"""
        return self._stack(lambda b: b.attn.b_K, (self.cfg.n_heads, self.cfg.d_head))

    @property
    def b_V(self) -> Tensor:
        """[n_layers, n_heads, d_head]"""
        return self._stack(lambda b: b.attn.b_V, (self.cfg.n_heads, self.cfg.d_head))

    @property
    def b_O(self) -> Tensor:
        """[n_layers, d_model], attention-output scale included"""
        return self._stack(lambda b: b.attn.b_O, (self.cfg.d_model,)) * self.cfg.attn_out_scale

    @property
    def QK(self) -> FactoredMatrix:
        """[n_layers, n_heads, d_model, d_model] as W_Q @ W_K^T (positions not included)"""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """[n_layers, n_heads, d_model, d_model] as W_V @ W_O"""
        return FactoredMatrix(self.W_V, self.W_O)

    # --- MLPs -----------------------------------------------------------------------------
    def _mlps(self) -> list:
        if self.cfg.attn_only:
            raise AttributeError("this model is attn_only: it has no MLP weights")
        return [b.mlp for b in self.blocks]

    @property
    def W_gate(self) -> Tensor:
        """[n_layers, d_model, d_mlp]: the left factor (hook_pre)"""
        return torch.stack([mlp.W_gate for mlp in self._mlps()])

    @property
    def W_in(self) -> Tensor:
        """[n_layers, d_model, d_mlp]: the right factor (hook_pre_linear)"""
        return torch.stack([mlp.W_in for mlp in self._mlps()])

    @property
    def W_out(self) -> Tensor:
        """[n_layers, d_mlp, d_model]"""
        return torch.stack([mlp.W_out for mlp in self._mlps()])

    @property
    def b_gate(self) -> Tensor:
        """[n_layers, d_mlp]"""
        return self._stack(lambda b: b.mlp.b_gate if hasattr(b, 'mlp') else None, (self.cfg.d_mlp,))

    @property
    def b_in(self) -> Tensor:
        """[n_layers, d_mlp]"""
        return self._stack(lambda b: b.mlp.b_in if hasattr(b, 'mlp') else None, (self.cfg.d_mlp,))

    @property
    def b_out(self) -> Tensor:
        """[n_layers, d_model]"""
        return self._stack(lambda b: b.mlp.b_out if hasattr(b, 'mlp') else None, (self.cfg.d_model,))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """Sum of the biases written to the residual stream before `layer`'s attention (or its MLP
        when `mlp_input`): [d_model]. Used by ActivationCache's full decomposition."""
        total = torch.zeros(self.cfg.d_model, dtype=self.cfg.dtype, device=self.W_E.device)
        b_O, b_out = self.b_O, self.b_out
        for l in range(layer):
            total = total + b_O[l]
            if include_mlp_biases:
                total = total + b_out[l]
        if mlp_input and layer < self.cfg.n_layers:
            total = total + b_O[layer]
        return total
