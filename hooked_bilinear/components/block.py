"""One pre-norm transformer block: resid_pre -> +attn -> resid_mid -> +mlp -> resid_post.

TransformerLens's optional hook points are here too, and fire only when their config flag is on
(`model.set_use_attn_in`, `set_use_split_qkv_input`, `set_use_hook_mlp_in`): the per-head copies
of the residual that attention reads, and the residual the MLP's norm reads. An `attn_only` block
has no MLP (and no ln2 / resid_mid / mlp_out hooks), as in TransformerLens.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import HookedBilinearConfig
from .attention import Attention, LayerKVCache
from .mlp import GatedMLP
from .norm import make_norm


def _per_head(x: Tensor, n_heads: int) -> Tensor:
    """[batch, pos, d_model] -> [batch, pos, n_heads, d_model] (a copy per head, so hooks can edit one)."""
    return x.unsqueeze(2).expand(-1, -1, n_heads, -1).clone()


class TransformerBlock(nn.Module):
    def __init__(self, cfg: HookedBilinearConfig):
        super().__init__()
        self.cfg = cfg
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_in = HookPoint()  # [batch, pos, n_heads, d_model]; cfg.use_attn_in
        self.hook_q_input = HookPoint()  # [batch, pos, n_heads, d_model]; cfg.use_split_qkv_input
        self.hook_k_input = HookPoint()  # [batch, pos, kv_heads, d_model]
        self.hook_v_input = HookPoint()  # [batch, pos, kv_heads, d_model]
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.hook_attn_out = HookPoint()
        if not cfg.attn_only:
            self.hook_resid_mid = HookPoint()
            self.hook_mlp_in = HookPoint()  # [batch, pos, d_model]; cfg.use_hook_mlp_in
            self.ln2 = make_norm(cfg)
            self.mlp = GatedMLP(cfg)
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid: Tensor,
        positions: Tensor,
        key_mask: Optional[Tensor] = None,
        kv_cache: Optional[LayerKVCache] = None,
        key_positions: Optional[Tensor] = None,
    ) -> Tensor:
        """resid: [batch, pos, d_model] -> [batch, pos, d_model]."""
        cfg = self.cfg
        resid = self.hook_resid_pre(resid)
        attn_in = self.hook_attn_in(_per_head(resid, cfg.n_heads)) if cfg.use_attn_in else resid
        if cfg.use_split_qkv_input:
            kv_heads = cfg.n_heads if cfg.ungroup_grouped_query_attention else cfg.n_key_value_heads
            q_in = self.hook_q_input(_per_head(resid, cfg.n_heads))
            k_in = self.hook_k_input(_per_head(resid, kv_heads))
            v_in = self.hook_v_input(_per_head(resid, kv_heads))
            # Each input through the norm separately, in TransformerLens's order (its hooks fire thrice).
            q_in, k_in, v_in = self.ln1(q_in), self.ln1(k_in), self.ln1(v_in)
            attn_out = self.attn(q_in, positions, key_mask, kv_cache, k_in, v_in, key_positions)
        else:
            attn_out = self.attn(self.ln1(attn_in), positions, key_mask, kv_cache, key_positions=key_positions)
        attn_out = self.hook_attn_out(attn_out)
        if cfg.attn_only:
            return self.hook_resid_post(resid + attn_out)
        resid = self.hook_resid_mid(resid + attn_out)
        mlp_in = self.hook_mlp_in(resid.clone()) if cfg.use_hook_mlp_in else resid
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
        return self.hook_resid_post(resid + mlp_out)
