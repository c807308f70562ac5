"""One pre-norm transformer block: resid_pre -> +attn -> resid_mid -> +mlp -> resid_post."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import HookedBilinearConfig
from .attention import Attention, LayerKVCache
from .mlp import GatedMLP
from .norm import make_norm


class TransformerBlock(nn.Module):
    def __init__(self, cfg: HookedBilinearConfig):
        super().__init__()
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
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
    ) -> Tensor:
        """resid: [batch, pos, d_model] -> [batch, pos, d_model]."""
        resid = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid), positions, key_mask, kv_cache))
        resid = self.hook_resid_mid(resid + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid)))
        return self.hook_resid_post(resid + mlp_out)
