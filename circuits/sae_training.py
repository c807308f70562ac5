"""Train an SAE on a hook of a `HookedBilinearTransformer` with SAELens (the field's trainer, not ours).

A thin wrapper: it packs already-tokenized rows into a `datasets.Dataset`, fills SAELens's
`LanguageModelSAERunnerConfig` with settings that fit a small model on a CPU (no wandb, no
checkpoints), and hands our model to `LanguageModelSAETrainingRunner(override_model=...)`. SAELens
calls `model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=...)`, which this model
implements with TransformerLens's names. Needs `pip install 'hooked-bilinear[sae]'` (sae-lens, which
requires transformer-lens < 4).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["train_sae"]


def train_sae(model: Any, hook_name: str, tokens: Tensor, *, d_sae: Optional[int] = None, k: int = 8,
              training_tokens: int = 200_000, lr: float = 3e-3, batch_tokens: int = 1024, seed: int = 0,
              output_path: Optional[str] = None, device: str = "cpu") -> Any:
    """A TopK SAE (SAELens `TopKTrainingSAE`, k active features) trained on `hook_name`.

    tokens: [n_rows, context] token ids; rows are reused when `training_tokens` asks for more.
    d_sae: default 4 x the hook's width (the paper's expansion). output_path: where SAELens saves the
    final SAE (`cfg.json` + `sae_weights.safetensors`; load it back with `circuits.load_sae(path)`),
    or None to keep it in memory only. Returns the trained SAELens SAE.
    """
    try:
        from datasets import Dataset
        from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
        from sae_lens import TopKTrainingSAEConfig
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("train_sae needs sae-lens: pip install 'hooked-bilinear[sae]' "
                          "(sae-lens requires transformer-lens < 4)") from e
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_rows, context] token ids, got shape {tuple(tokens.shape)}")
    d_in = model.cfg.d_model
    context = tokens.shape[1]
    # SAELens mixes activations in a buffer of n_batches_in_buffer x context tokens, which must
    # hold at least one training batch; it fills it store_batch rows at a time.
    store_batch = max(1, min(16, tokens.shape[0] // 4))
    n_buffer = max(8, -(-2 * batch_tokens // context))
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae or 4 * d_in, k=k),
        model_name=getattr(model.cfg, "model_name", "hooked-bilinear"), hook_name=hook_name,
        dataset_path="in-memory tokens", is_dataset_tokenized=True, streaming=False, context_size=context,
        training_tokens=training_tokens, train_batch_size_tokens=batch_tokens, store_batch_size_prompts=store_batch,
        n_batches_in_buffer=n_buffer, lr=lr, lr_warm_up_steps=0, device=device, prepend_bos=False, seed=seed,
        output_path=output_path, checkpoint_path=None, n_checkpoints=0, verbose=False,
        n_batches_for_norm_estimate=2, logger=LoggingConfig(log_to_wandb=False))
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()})
    torch.manual_seed(seed)
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
    return runner.run().eval()
