"""Text <-> tokens, with TransformerLens's method names, for a Hugging Face tokenizer."""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor


class TokenizerMixin:
    """Mixed into the model; expects `tokenizer` (or None), `cfg` and `W_E`."""

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer: pass token ids, or attach one with "
                "model.tokenizer = AutoTokenizer.from_pretrained(...)"
            )
        return self.tokenizer

    def to_tokens_and_mask(
        self,
        text: Union[str, Sequence[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        truncate: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Token ids [batch, pos] and an attention mask [batch, pos] (None when nothing is padded)."""
        tok = self._require_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        rows = []
        for t in texts:
            ids = tok.encode(t, add_special_tokens=False)
            rows.append(([bos] if prepend_bos and bos is not None else []) + ids)
        if truncate:
            rows = [r[: self.cfg.n_ctx] for r in rows]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        side = padding_side or getattr(tok, "padding_side", "right") or "right"
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            tokens[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
        device = self.W_E.device
        return tokens.to(device), (mask.to(device) if bool((mask == 0).any()) else None)

    def to_tokens(
        self,
        text: Union[str, Sequence[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        truncate: bool = False,
    ) -> Tensor:
        """Text (or a list of texts, padded) -> token ids [batch, pos]."""
        return self.to_tokens_and_mask(text, prepend_bos, padding_side, truncate)[0]

    def to_string(self, tokens: Union[Tensor, Sequence[int], int]) -> Union[str, list[str]]:
        """Token ids [pos] -> a string, or [batch, pos] -> a list of strings."""
        tok = self._require_tokenizer()
        if isinstance(tokens, int):
            tokens = [tokens]
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        return tok.decode(tokens.tolist())

    def to_str_tokens(self, input: Union[str, Tensor, Sequence[int]], prepend_bos: Optional[bool] = None) -> list[str]:
        """Each token of a text or a 1-D id sequence as its own string."""
        tok = self._require_tokenizer()
        ids = self.to_tokens(input, prepend_bos=prepend_bos)[0] if isinstance(input, str) else torch.as_tensor(input)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"to_str_tokens takes one sequence, got a batch of {ids.shape[0]}")
            ids = ids[0]
        return [tok.decode([i]) for i in ids.tolist()]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token."""
        ids = self.to_tokens(string, prepend_bos=False)[0]
        if ids.numel() != 1:
            raise ValueError(f"{string!r} is {ids.numel()} tokens ({self.to_str_tokens(ids)}), not one")
        return int(ids.item())

    def tokens_to_residual_directions(self, tokens: Union[str, int, Tensor]) -> Tensor:
        """The residual-stream direction whose dot product with the normalized final residual is a
        token's logit: `W_U[:, t]` times the final norm's gain ([d_model], or [..., d_model])."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        W_U = self.W_U
        gain = getattr(self.ln_final, "w", None)
        if gain is not None:
            W_U = W_U * gain[:, None]
        if isinstance(tokens, int) or (isinstance(tokens, Tensor) and tokens.ndim == 0):
            return W_U[:, int(tokens)]
        return W_U[:, torch.as_tensor(tokens, device=W_U.device)].movedim(0, -1)
