"""TransformerLens's weight processing, in place, for this model: `process_weights_`,
`center_writing_weights`, `center_unembed`, `fold_value_biases`, `refactor_factored_attn_matrices`
and `fold_attn_out_scale`. Each keeps the logits unchanged (up to float rounding).

Where the mathematics does not hold for a model, the direct method raises and says why;
`process_weights_` (what `from_pretrained` calls) skips such a step with a warning, as
TransformerLens does. The norm folding itself lives in `hooked_bilinear.folding`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .folding import fold_layer_norm


def _param_or_none(module: nn.Module, name: str):
    value = getattr(module, name, None)
    return value if isinstance(value, nn.Parameter) else None


class ProcessingMixin:
    """Mixed into the model; expects `cfg`, `embed`, `pos_embed`, `blocks`, `unembed`."""

    @torch.no_grad()
    def fold_attn_out_scale(self) -> Any:
        """Multiply `cfg.attn_out_scale` into every `W_O`/`b_O` and set it to 1.

        Afterwards each block's `attn.W_O` is what the residual stream receives, which is what
        TransformerLens's cache helpers (e.g. `stack_head_results` on 3.9) assume."""
        scale = self.cfg.attn_out_scale
        if scale != 1.0:
            for block in self.blocks:
                block.attn.W_O.mul_(scale)
                if block.attn.b_O is not None:
                    block.attn.b_O.mul_(scale)
                block.attn._result_contribution_scale = 1.0
            self.cfg.attn_out_scale = 1.0
        return self

    @torch.no_grad()
    def center_writing_weights(self) -> Any:
        """Subtract each output vector's mean over d_model from everything that writes to the
        residual stream (W_E, W_pos, W_O, b_O, W_out, b_out).

        Only LayerNorm ignores the residual's mean, so this needs normalization_type="LN"."""
        if self.cfg.normalization_type != "LN":
            raise ValueError(
                f"center_writing_weights changes the output unless every reader is a LayerNorm (which removes the "
                f"mean); this model has normalization_type={self.cfg.normalization_type!r}. Leave it out "
                "(process_weights_(center_writing_weights=False))"
            )
        for weight in [self.embed.W_E] + ([self.pos_embed.W_pos] if self.pos_embed is not None else []):
            weight.sub_(weight.mean(-1, keepdim=True))
        self.fold_attn_out_scale()  # the scale multiplies W_O; centre the weights that really write
        for block in self.blocks:
            attn = block.attn
            attn.W_O.sub_(attn.W_O.mean(-1, keepdim=True))
            if attn.b_O is not None:
                attn.b_O.sub_(attn.b_O.mean())
            if not self.cfg.attn_only:
                block.mlp.W_out.sub_(block.mlp.W_out.mean(-1, keepdim=True))
                if block.mlp.b_out is not None:
                    block.mlp.b_out.sub_(block.mlp.b_out.mean())
        return self

    @torch.no_grad()
    def center_unembed(self) -> Any:
        """Subtract the mean over the vocabulary from W_U (and b_U): softmax ignores a constant
        logit shift, so probabilities and the loss are unchanged (logits shift per position)."""
        unembed = self.unembed
        if getattr(unembed, "_tied_to", None):
            # W_U is a view of W_E here; centring it must not change the embedding.
            unembed.W_U = nn.Parameter(self.embed.W_E.T.clone())
            unembed._tied_to = None
            self.cfg.tie_embeddings = False
        unembed.W_U.sub_(unembed.W_U.mean(-1, keepdim=True))
        if _param_or_none(unembed, "b_U") is not None:
            unembed.b_U.sub_(unembed.b_U.mean())
        self.setup()
        return self

    @torch.no_grad()
    def fold_value_biases(self) -> Any:
        """Move the value biases into the output bias: b_O += sum_h b_V[h] @ W_O[h], b_V = 0.
        Attention patterns sum to one, so each head adds exactly b_V[h] @ W_O[h]."""
        for block in self.blocks:
            attn = block.attn
            if attn._b_V is None:
                continue
            attn.b_O.add_(torch.einsum("hk,hkd->d", attn.b_V, attn.W_O))
            attn._b_V.zero_()
        return self

    @torch.no_grad()
    def refactor_factored_attn_matrices(self) -> Any:
        """Re-factor each head's W_Q W_K^T and W_V W_O by SVD, as TransformerLens does:
        W_Q = U sqrt(S), W_K = V sqrt(S) (biases through an appended constant input), W_V = U S,
        W_O = V^T (a rotation), b_V folded into b_O. QK needs learned positions (with rotary the
        QK matrix depends on the positions) and ungrouped heads (grouped K/V are shared)."""
        cfg = self.cfg
        if cfg.positional_embedding_type == "rotary":
            raise ValueError(
                "refactor_factored_attn_matrices cannot refactor QK with rotary embeddings (the QK matrix depends "
                "on the query and key positions); use a model with positional_embedding_type='standard'"
            )
        if cfg.n_key_value_heads != cfg.n_heads:
            raise ValueError(
                f"refactor_factored_attn_matrices needs one key/value head per query head; this model groups "
                f"{cfg.n_heads} heads onto {cfg.n_key_value_heads} (refactoring would un-share them)"
            )
        self.fold_attn_out_scale()
        self.fold_value_biases()
        k = cfg.d_head
        for block in self.blocks:
            attn = block.attn
            ones = torch.ones(cfg.n_heads, 1, k, dtype=attn.W_Q.dtype, device=attn.W_Q.device)
            b_Q = attn.b_Q[:, None] if attn.b_Q is not None else 0 * ones
            b_K = attn._b_K[:, None] if attn._b_K is not None else 0 * ones
            W_Q = torch.cat([attn.W_Q, b_Q], dim=1)  # [heads, d_model + 1, d_head]
            W_K = torch.cat([attn._W_K, b_K], dim=1)
            U, S, Vh = torch.linalg.svd(W_Q @ W_K.transpose(-1, -2))
            root = S[:, :k].sqrt()[:, None, :]
            W_Q, W_K = U[:, :, :k] * root, Vh[:, :k].transpose(-1, -2) * root
            attn.W_Q.copy_(W_Q[:, :-1])
            attn._W_K.copy_(W_K[:, :-1])
            if attn.b_Q is not None:
                attn.b_Q.copy_(W_Q[:, -1])
                attn._b_K.copy_(W_K[:, -1])
            U, S, Vh = torch.linalg.svd(attn._W_V @ attn.W_O)
            attn._W_V.copy_(U[:, :, :k] * S[:, None, :k])
            attn.W_O.copy_(Vh[:, :k])
        return self

    def process_weights_(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        refactor_factored_attn_matrices: bool = False,
        fold_value_biases: bool = True,
    ) -> Any:
        """TransformerLens's processing, in place and with its defaults: fold the norms (and the
        attention-output scale), centre the writing weights (LayerNorm models only; skipped with a
        warning otherwise, as TransformerLens does), centre the unembedding, fold value biases and
        optionally refactor QK/OV."""
        if fold_ln and self.cfg.normalization_type is not None:
            fold_layer_norm(self, fold_attn_out_scale=True)
        self.fold_attn_out_scale()
        if center_writing_weights:
            if self.cfg.normalization_type == "LN":
                self.center_writing_weights()
            else:
                warnings.warn(
                    f"center_writing_weights skipped: it needs LayerNorm and this model has "
                    f"normalization_type={self.cfg.normalization_type!r}"
                )
        if center_unembed:
            self.center_unembed()
        if fold_value_biases:
            self.fold_value_biases()
        if refactor_factored_attn_matrices:
            self.refactor_factored_attn_matrices()
        return self
