"""Forward, caching and training-step speed: HF Llama vs TransformerLens's bridge vs ours, same weights.

    python benchmarks/bench_model.py            # ts-medium size, batch 8 x 256, float32, CPU
    python benchmarks/bench_model.py --quick    # a small model, for a smoke run

One run builds a random bilinear `LlamaForCausalLM(hidden_act="linear")`, wraps it in TransformerLens
4.x's `TransformerBridge`, converts it into a `HookedBilinearTransformer`, checks the three agree,
then times each row for each model, interleaved (round-robin) so machine noise hits all alike, and
reports each time as its median with the range of the samples, and ratios of medians. The table
goes to ``--out`` (default runs/benchmarks/bench_model.md; the README's table is
benchmarks/results/bench_model.md: pass that path to update it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchstats import default_out, fmt, write  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

SIZES = {
    "ts-medium": dict(n_layers=6, d_model=512, n_heads=8, d_mlp=2048, d_vocab=4096, n_ctx=256, batch=8),
    "quick": dict(n_layers=2, d_model=128, n_heads=4, d_mlp=512, d_vocab=512, n_ctx=64, batch=4),
}


def build_models(size: dict):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    from transformer_lens.model_bridge import TransformerBridge

    from hooked_bilinear.loading.llama import from_hf_llama

    config = LlamaConfig(
        hidden_size=size["d_model"], num_attention_heads=size["n_heads"], num_key_value_heads=size["n_heads"],
        intermediate_size=size["d_mlp"], num_hidden_layers=size["n_layers"], vocab_size=size["d_vocab"],
        max_position_embeddings=size["n_ctx"], hidden_act="linear", tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    ours = from_hf_llama(hf).eval()
    # The bridge loads from a folder: save the same weights and a throwaway tokenizer there.
    folder = tempfile.mkdtemp(prefix="bench_model_")
    hf.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(size["d_vocab"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t0", pad_token="t0", unk_token="t1").save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu")
    return hf, bridge, ours


def cache_bytes(cache) -> int:
    return sum(v.numel() * v.element_size() for v in cache.values() if isinstance(v, torch.Tensor))


def measure(rows: dict, repeats: int) -> dict[str, list[float]]:
    """Round-robin over every (row, model) callable, `repeats` times; returns seconds per call."""
    times = {key: [] for key in rows}
    for fn in rows.values():  # warm-up
        fn()
    for _ in range(repeats):
        for key, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=default_out("bench_model"), help="markdown table (default: untracked)")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "ts-medium"]
    torch.set_num_threads(os.cpu_count() or 1)

    hf, bridge, ours = build_models(size)
    tokens = torch.randint(0, size["d_vocab"], (size["batch"], size["n_ctx"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf(tokens).logits
        for name, logits in (("bridge", bridge(tokens)), ("ours", ours(tokens))):
            error = (logits - reference).abs().max().item()
            print(f"max |logits - HF| for {name}: {error:.2e}")
            assert error < 1e-3, f"{name} disagrees with HF"

    one_name_ours, one_name_bridge = "blocks.3.hook_resid_post", "blocks.3.hook_resid_post"
    if size["n_layers"] <= 3:
        one_name_ours = one_name_bridge = "blocks.1.hook_resid_post"

    def train_step(model, loss_fn):
        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(model).backward()
        return step

    hf_loss = lambda m: m(tokens, labels=tokens).loss
    tl_loss = lambda m: m(tokens, return_type="loss")
    rows = {}
    with torch.no_grad():
        rows[("forward", "HF")] = lambda: hf(tokens).logits
        rows[("forward", "bridge")] = lambda: bridge(tokens)
        rows[("forward", "ours")] = lambda: ours(tokens)
        rows[("run_with_cache, every hook", "bridge")] = lambda: bridge.run_with_cache(tokens)
        rows[("run_with_cache, every hook", "ours")] = lambda: ours.run_with_cache(tokens)
        rows[("run_with_cache, one name", "bridge")] = lambda: bridge.run_with_cache(tokens, names_filter=one_name_bridge)
        rows[("run_with_cache, one name", "ours")] = lambda: ours.run_with_cache(tokens, names_filter=one_name_ours)
        timed = measure(rows, args.repeats)
    train_rows = {
        ("training step (fwd + bwd)", "HF"): train_step(hf, hf_loss),
        ("training step (fwd + bwd)", "bridge"): train_step(bridge, tl_loss),
        ("training step (fwd + bwd)", "ours"): train_step(ours, tl_loss),
    }
    timed.update(measure(train_rows, max(2, args.repeats // 2)))

    with torch.no_grad():
        memory = {"bridge": cache_bytes(bridge.run_with_cache(tokens)[1]), "ours": cache_bytes(ours.run_with_cache(tokens)[1])}

    medians = {key: statistics.median(values) for key, values in timed.items()}
    hf_forward = medians[("forward", "HF")]
    row_names = list(dict.fromkeys(key[0] for key in medians))
    lines = [
        f"Size: {size['n_layers']} layers, d_model {size['d_model']}, d_mlp {size['d_mlp']}, vocab {size['d_vocab']}, "
        f"batch {size['batch']} x {size['n_ctx']}, float32, {torch.get_num_threads()} CPU threads; "
        f"median [range, n] of {args.repeats} (training: {max(2, args.repeats // 2)}); ratio = median / median of HF forward.",
        "",
        "| row | HF LlamaForCausalLM | TransformerLens bridge | HookedBilinearTransformer | ours / bridge |",
        "|---|---|---|---|---|",
    ]
    for row in row_names:
        cells = []
        for model in ("HF", "bridge", "ours"):
            t = medians.get((row, model))
            cells.append("n/a" if t is None else f"{fmt(timed[(row, model)])} ({t / hf_forward:.2f}x)")
        ratio = medians[(row, "ours")] / medians[(row, "bridge")]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    lines.append(
        f"| full cache size | n/a | {memory['bridge'] / 2**20:.0f} MiB | {memory['ours'] / 2**20:.0f} MiB | "
        f"{memory['ours'] / memory['bridge']:.2f} |"
    )
    ours_fwd = medians[("forward", "ours")]
    lines += [
        "",
        f"Targets: our forward / HF forward = {ours_fwd / hf_forward:.3f} (goal <= 1.05); "
        f"our full run_with_cache / our forward = {medians[('run_with_cache, every hook', 'ours')] / ours_fwd:.3f} (goal <= 1.3); "
        f"ours ahead of the bridge on every row: {all(medians[(r, 'ours')] < medians[(r, 'bridge')] for r in row_names) and memory['ours'] <= memory['bridge']}.",
    ]
    table = "\n".join(lines)
    print(table)
    write(args.out, table + "\n")


if __name__ == "__main__":
    main()
