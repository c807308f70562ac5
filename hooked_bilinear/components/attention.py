"""Causal self-attention with grouped-query heads, rotary or learned positions and a KV cache.

Hook points follow TransformerLens: hook_q/k/v (before rotation), hook_rot_q/k, hook_attn_scores
(scaled and masked, before softmax), hook_pattern, hook_z, and hook_result (each head's output,
only with `cfg.use_attn_result`). When nothing hooks the scores or the
pattern, attention runs through `scaled_dot_product_attention` and never forms them; otherwise it
runs the explicit path so those hooks see (and may edit) the real tensors. Both give equal results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from ..config import HookedBilinearConfig
from .rotary import Rotary


@dataclass
class LayerKVCache:
    """Keys and values of the positions seen so far: [batch, seen, n_key_value_heads, d_head]."""

    k: Optional[Tensor] = None
    v: Optional[Tensor] = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: HookedBilinearConfig):
        super().__init__()
        self.cfg = cfg
        h, kv, d, k, dtype = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head, cfg.dtype
        self.W_Q = nn.Parameter(torch.empty(h, d, k, dtype=dtype))
        self._W_K = nn.Parameter(torch.empty(kv, d, k, dtype=dtype))
        self._W_V = nn.Parameter(torch.empty(kv, d, k, dtype=dtype))
        self.W_O = nn.Parameter(torch.empty(h, k, d, dtype=dtype))
        if cfg.attn_bias:
            self.b_Q = nn.Parameter(torch.zeros(h, k, dtype=dtype))
            self._b_K = nn.Parameter(torch.zeros(kv, k, dtype=dtype))
            self._b_V = nn.Parameter(torch.zeros(kv, k, dtype=dtype))
            self.b_O = nn.Parameter(torch.zeros(d, dtype=dtype))
        else:
            self.b_Q = self._b_K = self._b_V = self.b_O = None
        self.rotary = (
            Rotary(cfg.rotary_dim, cfg.n_ctx, cfg.rotary_base) if cfg.positional_embedding_type == "rotary" else None
        )
        self.scale = 1.0 / math.sqrt(k)
        # ActivationCache multiplies per-head results by this, matching the scaled layer output.
        self._result_contribution_scale = cfg.attn_out_scale

        self.hook_q = HookPoint()  # [batch, pos, n_heads, d_head]
        self.hook_k = HookPoint()  # [batch, pos, n_key_value_heads, d_head]
        self.hook_v = HookPoint()  # [batch, pos, n_key_value_heads, d_head]
        self.hook_rot_q = HookPoint()
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, n_heads, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, n_heads, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, n_heads, d_head]
        self.hook_result = HookPoint()  # [batch, pos, n_heads, d_model]; fires with cfg.use_attn_result

    # Per-head views repeat the shared keys/values, as TransformerLens does for grouped-query attention.
    @property
    def W_K(self) -> Tensor:
        return self._repeat_kv(self._W_K)

    @property
    def W_V(self) -> Tensor:
        return self._repeat_kv(self._W_V)

    @property
    def b_K(self) -> Optional[Tensor]:
        return None if self._b_K is None else self._repeat_kv(self._b_K)

    @property
    def b_V(self) -> Optional[Tensor]:
        return None if self._b_V is None else self._repeat_kv(self._b_V)

    @property
    def QK(self) -> FactoredMatrix:
        """[n_heads, d_model, d_model] as W_Q @ W_K^T (positions not included)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """[n_heads, d_model, d_model] as W_V @ W_O, attention-output scale included."""
        return FactoredMatrix(self.W_V, self.W_O * self.cfg.attn_out_scale)

    def _repeat_kv(self, t: Tensor, dim: int = 0) -> Tensor:
        group = self.cfg.n_heads // self.cfg.n_key_value_heads
        return t if group == 1 else t.repeat_interleave(group, dim=dim)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        key_mask: Optional[Tensor] = None,
        kv_cache: Optional[LayerKVCache] = None,
        key_input: Optional[Tensor] = None,
        value_input: Optional[Tensor] = None,
        key_positions: Optional[Tensor] = None,
    ) -> Tensor:
        """x: [batch, pos, d_model], or the per-head query input [batch, pos, n_heads, d_model] (with
        `key_input`/`value_input` [batch, pos, kv_heads, d_model], TransformerLens's split inputs);
        positions: [batch, pos]; key_mask: [batch, key_pos] bool (False at padding, covering cached
        and new positions); kv_cache: ours, or a TransformerLens `TransformerLensKeyValueCacheEntry`
        (which stores keys before rotation, so `key_positions` [batch, key_pos] must come with it)
        -> [batch, pos, d_model]."""
        q, k, v = self._project_qkv(x, key_input, value_input)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        tl_entry = kv_cache is not None and hasattr(kv_cache, "past_keys")
        if tl_entry:
            # TransformerLens's cache: append the unrotated keys, then rotate all of them.
            past = kv_cache.past_keys.shape[1]
            k, v = kv_cache.append(k, v)
        if self.rotary is not None:
            q = self.hook_rot_q(self.rotary(q, positions))
            k = self.hook_rot_k(self.rotary(k, key_positions if tl_entry else positions))
        if kv_cache is not None and not tl_entry:
            past = 0 if kv_cache.k is None else kv_cache.k.shape[1]
            k, v = kv_cache.extend(k, v)
        elif not tl_entry:
            past = 0
        mask = self._attention_mask(q.shape[1], k.shape[1], past, key_mask, x.device)

        grouped = k.shape[2] != q.shape[2]
        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            z = self._explicit_attention(q, k, v, mask)
        else:
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=mask,
                is_causal=mask is None and q.shape[1] > 1,
                scale=self.scale,
                enable_gqa=grouped,
            ).transpose(1, 2)
        z = self.hook_z(z)
        scale = self.cfg.attn_out_scale
        if self.cfg.use_attn_result:
            # Each head's write to the residual stream, scale included: [batch, pos, n_heads, d_model].
            result = self.hook_result(torch.einsum("bphk,hkd->bphd", z, self.W_O * scale))
            out = result.sum(-2)
            return out + self.b_O * scale if self.b_O is not None else out
        out = einops.rearrange(z, "b p h k -> b p (h k)") @ einops.rearrange(self.W_O, "h k d -> (h k) d")
        if self.b_O is not None:
            out = out + self.b_O
        return out * scale if scale != 1.0 else out

    def _project_qkv(
        self, x: Tensor, key_input: Optional[Tensor], value_input: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries [batch, pos, n_heads, d_head]; keys and values with n_key_value_heads heads, or
        n_heads when `cfg.ungroup_grouped_query_attention` (TransformerLens's layout for hooks)."""
        ungroup = self.cfg.ungroup_grouped_query_attention
        if x.ndim == 4:  # per-head inputs (use_attn_in / use_split_qkv_input)
            key_input = x if key_input is None else key_input
            value_input = x if value_input is None else value_input
            W_K, W_V = (self.W_K, self.W_V) if key_input.shape[2] == self.cfg.n_heads else (self._W_K, self._W_V)
            q = torch.einsum("bphd,hdk->bphk", x, self.W_Q)
            k = torch.einsum("bphd,hdk->bphk", key_input, W_K)
            v = torch.einsum("bphd,hdk->bphk", value_input, W_V)
            if self.b_Q is not None:
                grouped_bias = W_K.shape[0] != self.cfg.n_heads
                q = q + self.b_Q
                k = k + (self._b_K if grouped_bias else self.b_K)
                v = v + (self._b_V if grouped_bias else self.b_V)
        elif x.shape[0] * x.shape[1] <= self.cfg.d_head:
            # Few rows (a generation step): one batched product per projection reads each
            # [head, d_model, d_head] weight in place, where fusing them (below) would copy every
            # attention weight at every step. Copying the few rows per head is the cheaper side.
            flat = x.reshape(-1, x.shape[-1])
            q, k, v = (torch.matmul(flat, W).transpose(0, 1).unflatten(0, x.shape[:2])
                       for W in (self.W_Q, self._W_K, self._W_V))
            if self.b_Q is not None:
                q, k, v = q + self.b_Q, k + self._b_K, v + self._b_V
        else:
            # One matmul for queries, keys and values: the per-head weight layout [head, d_model, d_head]
            # is TransformerLens's, but a single [d_model, (heads) d_head] GEMM is what is fast.
            Ws = (self.W_Q, self._W_K, self._W_V)
            W_qkv = torch.cat([einops.rearrange(W, "h d k -> d (h k)") for W in Ws], dim=1)
            qkv = x @ W_qkv
            n_q, n_kv = self.cfg.n_heads * self.cfg.d_head, self.cfg.n_key_value_heads * self.cfg.d_head
            q, k, v = qkv.split([n_q, n_kv, n_kv], dim=-1)
            q = q.unflatten(-1, (self.cfg.n_heads, self.cfg.d_head))
            k = k.unflatten(-1, (self.cfg.n_key_value_heads, self.cfg.d_head))
            v = v.unflatten(-1, (self.cfg.n_key_value_heads, self.cfg.d_head))
            if self.b_Q is not None:
                q, k, v = q + self.b_Q, k + self._b_K, v + self._b_V
        if ungroup and k.shape[2] != self.cfg.n_heads:
            k, v = self._repeat_kv(k, dim=2), self._repeat_kv(v, dim=2)
        return q, k, v

    @staticmethod
    def _attention_mask(
        n_query: int, n_key: int, past: int, key_mask: Optional[Tensor], device: torch.device
    ) -> Optional[Tensor]:
        """Boolean [batch|1, 1, query, key] mask (True = attend), or None for the plain causal case."""
        if key_mask is None and past == 0:
            return None  # causal and square: the fused kernel's is_causal covers it
        query_index = torch.arange(n_query, device=device)[:, None] + past
        key_index = torch.arange(n_key, device=device)[None, :]
        allowed = (key_index <= query_index)[None, None]
        if key_mask is not None:
            # A query always sees itself, so rows at padding positions stay finite (they are ignored).
            allowed = allowed & key_mask[:, None, None, :].bool() | (key_index == query_index)[None, None]
        return allowed

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        if k.shape[2] != q.shape[2]:
            k, v = self._repeat_kv(k, dim=2), self._repeat_kv(v, dim=2)
        scores = torch.einsum("bqhk,bshk->bhqs", q, k) * self.scale
        if mask is None:
            mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()[None, None]
        scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
        pattern = self.hook_pattern(torch.softmax(scores.float(), dim=-1).to(v.dtype))
        return torch.einsum("bhqs,bshk->bqhk", pattern, v)
