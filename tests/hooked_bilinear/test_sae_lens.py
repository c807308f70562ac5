"""SAELens on this model, without adapters (runs where the [sae] extra is installed: CI's
transformer-lens 3.9 leg; skipped elsewhere)."""

import pytest
import torch

pytest.importorskip("sae_lens", reason="needs the [sae] extra (sae-lens, transformer-lens 3.9)")
from datasets import Dataset  # noqa: E402
from sae_lens import (  # noqa: E402
    LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig, StandardTrainingSAEConfig,
)
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig  # noqa: E402

from hooked_bilinear import HookedBilinearTransformer  # noqa: E402
from hooked_bilinear.sae import HookedSAEBilinearTransformer  # noqa: E402

from ..conftest import tiny_config  # noqa: E402

HOOK = "blocks.0.hook_mlp_out"


def test_training_runner_trains_an_sae_on_this_model(tmp_path, word_tokenizer):
    model = HookedBilinearTransformer(tiny_config(d_vocab=len(word_tokenizer), n_ctx=32), tokenizer=word_tokenizer)
    rows = torch.randint(2, len(word_tokenizer), (256, 16), generator=torch.Generator().manual_seed(0))
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=32, d_sae=64, l1_coefficient=1e-3),
        model_name="tiny-bilinear", hook_name=HOOK, dataset_path="unused", is_dataset_tokenized=True,
        streaming=False, context_size=16, training_tokens=2048, train_batch_size_tokens=128,
        store_batch_size_prompts=16, n_batches_in_buffer=8, n_batches_for_norm_estimate=2, lr=3e-3,
        device="cpu", logger=LoggingConfig(log_to_wandb=False), output_path=str(tmp_path),
        checkpoint_path=str(tmp_path), prepend_bos=True, verbose=False, seed=0,
    )
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=model, override_dataset=Dataset.from_dict({"input_ids": rows.tolist()})
    )
    untrained = {k: v.clone() for k, v in runner.sae.state_dict().items()}
    sae = runner.run()

    # it learned: reconstructs this model's activations better than its own initialisation did
    _, cache = model.run_with_cache(rows[:32], names_filter=HOOK)
    acts = cache[HOOK].flatten(0, 1)
    fresh = type(sae)(sae.cfg)
    fresh.load_state_dict(untrained)
    with torch.no_grad():
        trained_mse = (sae(acts) - acts).pow(2).mean()
        fresh_mse = (fresh(acts) - acts).pow(2).mean()
    assert trained_mse < 0.75 * fresh_mse, (trained_mse, fresh_mse)


def test_saes_splice_with_sae_lens_semantics():
    model = HookedBilinearTransformer(tiny_config())
    tokens = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(0))
    clean = model(tokens)
    model = HookedSAEBilinearTransformer.from_model(model)
    sae_cfg = StandardSAEConfig(d_in=32, d_sae=64)
    sae_cfg.metadata.hook_name = HOOK
    sae = StandardSAE(sae_cfg)

    spliced = model.run_with_saes(tokens, saes=[sae])
    assert (spliced - clean).abs().max() > 1e-3  # the SAE's reconstruction replaced the activation
    assert not model.acts_to_saes  # and was removed afterwards

    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    torch.testing.assert_close(logits, clean, atol=1e-5, rtol=1e-5)  # the error term restores the output
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    assert acts.shape == (2, 8, 64)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], model.run_with_cache(tokens)[1][HOOK])

    model.add_sae(sae)
    torch.testing.assert_close(model(tokens), spliced)
    model.reset_saes()
    torch.testing.assert_close(model(tokens), clean)
