"""Fold normalization gains into the weights that read the normalized residual.

After folding, every norm is a plain `x / scale` (unit gain, zero bias), so the MLP's quadratic
form and the attention circuits are read straight off `W_gate`, `W_in`, `W_Q`, ... Logits do not
change (up to float rounding). LN biases become biases of the reading layers, which are created if
the model had none. Optionally the attention-output scale is folded into `W_O` and `b_O` as well.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn


def _gain_and_bias(norm: nn.Module) -> tuple[Optional[Tensor], Optional[Tensor]]:
    return getattr(norm, "w", None), getattr(norm, "b", None)


def _ensure_bias(module: nn.Module, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if not isinstance(getattr(module, name), nn.Parameter):  # None, or a zero stand-in buffer
        module._buffers.pop(name, None)
        setattr(module, name, nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device)))
    return getattr(module, name)


def _reset_norm(norm: nn.Module) -> None:
    w, b = _gain_and_bias(norm)
    if w is not None:
        w.fill_(1.0)
    if b is not None:
        b.zero_()


@torch.no_grad()
def fold_layer_norm(model: Any, fold_attn_out_scale: bool = True) -> None:
    """In place: ln1 into W_Q/W_K/W_V, ln2 into W_gate/W_in, ln_final into W_U (untying a tied
    embedding, since W_E must keep its own values)."""
    cfg = model.cfg
    for block in model.blocks:
        w, b = _gain_and_bias(block.ln1)
        attn = block.attn
        if b is not None and b.abs().max() > 0:
            # A bias read by a linear map is a bias of that map: b W.
            cfg.attn_bias = True
            for name, weight in (("b_Q", attn.W_Q), ("_b_K", attn._W_K), ("_b_V", attn._W_V)):
                _ensure_bias(attn, name, weight.shape[::2], weight).add_(torch.einsum("d,hdk->hk", b, weight))
            _ensure_bias(attn, "b_O", (cfg.d_model,), attn.W_O)
        if w is not None:
            for weight in (attn.W_Q, attn._W_K, attn._W_V):
                weight.mul_(w[None, :, None])
        _reset_norm(block.ln1)

        if not cfg.attn_only:  # an attn_only block has no ln2 and no MLP
            w, b = _gain_and_bias(block.ln2)
            mlp = block.mlp
            if b is not None and b.abs().max() > 0:
                cfg.mlp_bias = True
                _ensure_bias(mlp, "b_gate", (cfg.d_mlp,), mlp.W_gate).add_(b @ mlp.W_gate)
                _ensure_bias(mlp, "b_in", (cfg.d_mlp,), mlp.W_in).add_(b @ mlp.W_in)
                _ensure_bias(mlp, "b_out", (cfg.d_model,), mlp.W_out)
            if w is not None:
                mlp.W_gate.mul_(w[:, None])
                mlp.W_in.mul_(w[:, None])
            _reset_norm(block.ln2)

        if fold_attn_out_scale and cfg.attn_out_scale != 1.0:
            attn.W_O.mul_(cfg.attn_out_scale)
            if attn.b_O is not None:
                attn.b_O.mul_(cfg.attn_out_scale)

    if fold_attn_out_scale and cfg.attn_out_scale != 1.0:
        cfg.attn_out_scale = 1.0
        for block in model.blocks:
            block.attn._result_contribution_scale = 1.0

    w, b = _gain_and_bias(model.ln_final)
    if w is not None or (b is not None and b.abs().max() > 0):
        unembed = model.unembed
        if cfg.tie_embeddings:
            untied = nn.Parameter(model.W_E.T.clone())
            unembed._tied_to = None
            unembed.W_U = untied
            cfg.tie_embeddings = False
        if b is not None and b.abs().max() > 0:
            cfg.unembed_bias = True
            _ensure_bias(unembed, "b_U", (cfg.d_vocab,), unembed.W_U).add_(b @ unembed.W_U)
        if w is not None:
            unembed.W_U.mul_(w[:, None])
        _reset_norm(model.ln_final)
    model.setup()


@torch.no_grad()
def fold_zero_beta_gate(model: Any) -> None:
    """In place: a model whose gate is `x * sigmoid(0 * x) = x / 2` becomes exactly bilinear.

    The factor 1/2 goes into `W_gate` (and `b_gate`), `act_fn` becomes "linear" and `gate_beta`
    None, so the logits are unchanged and the MLPs are plain quadratic forms again. This is the
    last step of SwiGLU -> bilinear finetuning."""
    cfg = model.cfg
    if cfg.gate_beta is None or cfg.gate_beta != 0.0:
        raise ValueError(
            f"only a gate annealed to beta = 0 folds into a bilinear MLP; this model has gate_beta={cfg.gate_beta}"
        )
    for block in model.blocks:
        block.mlp.W_gate.mul_(0.5)
        if block.mlp.b_gate is not None:
            block.mlp.b_gate.mul_(0.5)
    cfg.gate_beta = None
    cfg.act_fn = "linear"
