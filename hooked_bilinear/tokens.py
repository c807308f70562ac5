"""Text <-> tokens, with TransformerLens's method names, for a Hugging Face tokenizer."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor


class _TokenNotFound(ValueError, AssertionError):
    """The token is not in the input."""


class NoTokenizerError(ValueError, AssertionError):
    """Text in or out needs a tokenizer. Also an AssertionError, which TransformerLens raises here."""


class TokenizerMixin:
    """Mixed into the model; expects `tokenizer` (or None), `cfg` and `W_E`."""

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise NoTokenizerError(
                "this model has no tokenizer: pass token ids, or attach one with "
                "model.set_tokenizer(AutoTokenizer.from_pretrained(...))"
            )
        return self.tokenizer

    def set_tokenizer(self, tokenizer: Any, default_padding_side: Optional[Literal["left", "right"]] = None) -> None:
        """Attach a Hugging Face tokenizer (TransformerLens's method): sets the padding side if given,
        and falls back to the end-of-text token for a missing pad/BOS token, as TransformerLens does."""
        if default_padding_side not in ("left", "right", None):
            raise ValueError(f"default_padding_side must be 'left', 'right' or None, got {default_padding_side!r}")
        if default_padding_side is not None:
            tokenizer.padding_side = default_padding_side
        if getattr(tokenizer, "padding_side", None) is None:
            tokenizer.padding_side = "right"
        if tokenizer.eos_token is None:
            tokenizer.eos_token = "<|endoftext|>"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.bos_token is None:
            tokenizer.bos_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def to_tokens_and_mask(
        self,
        text: Union[str, Sequence[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        truncate: bool = False,
        move_to_device: bool = True,
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
        mask = mask if bool((mask == 0).any()) else None
        if move_to_device:
            device = self.W_E.device
            tokens, mask = tokens.to(device), (None if mask is None else mask.to(device))
        return tokens, mask

    def to_tokens(
        self,
        input: Union[str, Sequence[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Tensor:
        """Text (or a list of texts, padded) -> token ids [batch, pos], with TransformerLens's
        arguments and defaults (truncated to n_ctx unless truncate=False)."""
        return self.to_tokens_and_mask(input, prepend_bos, padding_side, truncate, move_to_device)[0]

    def to_string(self, tokens: Union[Tensor, Sequence[int], int, np.ndarray]) -> Union[str, list[str]]:
        """Token ids [pos] -> a string, or [batch, pos] -> a list of strings."""
        tok = self._require_tokenizer()
        if isinstance(tokens, int):
            tokens = [tokens]
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return tok.batch_decode(tokens.tolist(), clean_up_tokenization_spaces=False)
        if tokens.ndim > 2:
            raise ValueError(f"to_string takes [pos] or [batch, pos] token ids, got shape {tuple(tokens.shape)}")
        return tok.decode(tokens.reshape(-1).tolist(), clean_up_tokenization_spaces=False)

    def to_str_tokens(
        self,
        input: Union[str, Tensor, np.ndarray, list],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
    ) -> Union[list[str], list[list[str]]]:
        """Each token as its own string: a text or ids [pos] / [1, pos] -> list[str]; a list of
        texts (or of id tensors) -> one list per element, as TransformerLens does."""
        tok = self._require_tokenizer()
        if isinstance(input, (list, tuple)) and input and not isinstance(input[0], (int, np.integer)):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        else:
            ids = torch.as_tensor(input).squeeze()  # drop a trivial batch dimension
            if ids.ndim == 0:
                ids = ids[None]
            if ids.ndim != 1:
                raise ValueError(f"to_str_tokens takes one sequence ([pos] or [1, pos]), got shape {tuple(ids.shape)}")
        return tok.batch_decode([[i] for i in ids.tolist()], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token."""
        ids = self.to_tokens(string, prepend_bos=False)[0]
        if ids.numel() != 1:
            raise ValueError(f"{string!r} is {ids.numel()} tokens ({self.to_str_tokens(ids)}), not one")
        return int(ids.item())

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        if not isinstance(int_token, (int, np.integer)) or isinstance(int_token, bool):
            raise ValueError(f"to_single_str_token takes one int token id, got {int_token!r}")
        return self.to_str_tokens(torch.tensor([int(int_token)]))[0]

    def get_token_position(
        self,
        single_token: Union[str, int, Tensor],
        input: Union[str, Tensor],
        mode: Literal["first", "last"] = "first",
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
    ) -> int:
        """Position of `single_token` (a one-token string or an id) in a text or ids [pos] / [1, pos]."""
        tokens = self.to_tokens(input, prepend_bos, padding_side) if isinstance(input, str) else input
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"token ids must be [pos] or [1, pos], got shape {tuple(tokens.shape)}")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token.item())
        indices = torch.nonzero(tokens == single_token).flatten()
        if len(indices) == 0:
            # AssertionError as well as ValueError: TransformerLens raises an AssertionError here.
            raise _TokenNotFound("The token does not occur in the prompt")  # TransformerLens's words
        if mode == "first":
            return int(indices[0])
        if mode == "last":
            return int(indices[-1])
        raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")

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
