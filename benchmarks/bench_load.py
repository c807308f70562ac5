"""Loading, saving, conversion and generation, side by side with `transformers`, each measurement
in a fresh process (so peak RSS is that operation's own, and no cache is warm inside Python).

    python benchmarks/bench_load.py --workdir /tmp/bench_load        # TinyLlama-shaped, 2.2 GB in workdir
    python benchmarks/bench_load.py --quick --workdir /tmp/bl_quick  # a small model, for a smoke run

The first run writes a TinyLlama-shaped checkpoint with random weights into --workdir (22 layers,
d_model 2048, d_mlp 5632, 32 heads, 4 kv heads, vocab 32000, bfloat16; ~2.2 GB, never in the
repository), a sharded copy, and our native copy. Rows (libraries imported before the clock starts;
peak RSS = the process's ru_maxrss, memory-mapped file pages included):

* load: `AutoModelForCausalLM.from_pretrained(dtype=bfloat16)` vs `from_pretrained(dtype="bfloat16")`,
  single file and sharded; then "load + forward": one 8-token forward pass, which reads every weight
  page (a lazily mapped checkpoint costs its memory here, not at load);
* native load (our own format), to_hf() after loading, save_pretrained(format="hf") vs HF's
  save_pretrained;
* generate: ts-medium size (6 layers, d 512, mlp 2048, 8 heads, vocab 4096), float32, batch 4,
  16-token prompts, 128 new tokens, greedy, KV cache; the same weights in both (ours -> to_hf()),
  and the same tokens checked.

Reports medians with the range over --repeats fresh processes, interleaved so machine noise hits
both sides alike. Writes JSON and a markdown table to --out (default runs/benchmarks/bench_load.md,
untracked).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchstats import default_out, fmt, ratio, write  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "quick": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4000, max_position_embeddings=256),
}
GEN = {"tinyllama": dict(n_layers=6, d_model=512, n_heads=8, d_mlp=2048, d_vocab=4096, new=128),
       "quick": dict(n_layers=2, d_model=128, n_heads=4, d_mlp=512, d_vocab=512, new=32)}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


# --- preparation (once, in this process's children) -------------------------------------------


def make_checkpoints(workdir: Path, size: str) -> None:
    """Random bf16 Llama checkpoint (single file and sharded) and our native copy, if missing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    single, sharded, native = workdir / "llama", workdir / "llama_sharded", workdir / "native"
    if not (single / "config.json").is_file():
        config = LlamaConfig(**SIZES[size], rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():  # random normal, one tensor at a time
                p.copy_(torch.ones(p.shape) if p.ndim == 1 else torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(single)
        del model
    if not (sharded / "config.json").is_file():
        LlamaForCausalLM.from_pretrained(single, dtype=torch.bfloat16).save_pretrained(sharded, max_shard_size="500MB")
    if not (native / "config.json").is_file():
        from hooked_bilinear import HookedBilinearTransformer

        HookedBilinearTransformer.from_pretrained(single, dtype="bfloat16", tokenizer=False).save_pretrained(native)


# --- one measurement per child process ----------------------------------------------------------


def child(kind: str, arg: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    # Both sides pay their imports before the clock (transformers imports model classes lazily).
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM

    from hooked_bilinear import HookedBilinearTransformer

    out: dict = {}
    tokens = torch.randint(0, 1000, (1, 8))

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        out["s"] = time.perf_counter() - start
        out["peak_gb"] = peak_rss_gb()
        return result

    with torch.inference_mode():
        if kind in ("hf_load", "hf_load_fwd"):
            model = timed(lambda: AutoModelForCausalLM.from_pretrained(arg, dtype=torch.bfloat16))
            if kind.endswith("fwd"):
                model(tokens)
        elif kind in ("ours_load", "ours_load_fwd", "ours_native", "ours_native_fwd"):
            model = timed(lambda: HookedBilinearTransformer.from_pretrained(arg, dtype="bfloat16", tokenizer=False))
            if kind.endswith("fwd"):
                model(tokens)
        elif kind == "ours_to_hf":
            model = HookedBilinearTransformer.from_pretrained(arg, dtype="bfloat16", tokenizer=False)
            out["before_gb"] = peak_rss_gb()
            timed(model.to_hf)
        elif kind in ("ours_save_hf", "hf_save"):
            target = Path(arg).parent / f"save_{kind}_{os.getpid()}"
            if kind == "hf_save":
                model = AutoModelForCausalLM.from_pretrained(arg, dtype=torch.bfloat16)
                timed(lambda: model.save_pretrained(target))
            else:
                model = HookedBilinearTransformer.from_pretrained(arg, dtype="bfloat16", tokenizer=False)
                timed(lambda: model.save_pretrained(target, format="hf"))
            shutil.rmtree(target, ignore_errors=True)
        elif kind in ("ours_generate", "hf_generate", "gen_check"):
            out.update(generation(kind, json.loads(arg)))
        else:
            raise ValueError(kind)
    out["final_gb"] = peak_rss_gb()
    return out


def generation(kind: str, size: dict) -> dict:
    import torch

    from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer

    cfg = HookedBilinearConfig(d_model=size["d_model"], d_head=size["d_model"] // size["n_heads"],
                               n_layers=size["n_layers"], n_ctx=256, d_vocab=size["d_vocab"], d_mlp=size["d_mlp"],
                               seed=0, initializer_range=0.05)
    ours = HookedBilinearTransformer(cfg).eval()
    hf = ours.to_hf()
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    prompt = torch.randint(0, size["d_vocab"], (4, 16), generator=torch.Generator().manual_seed(0))
    new = size["new"]

    def run_ours():
        return ours.generate(prompt, max_new_tokens=new, do_sample=False, stop_at_eos=False, verbose=False)

    def run_hf():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False)

    if kind == "gen_check":
        a, b = run_ours(), run_hf()
        return {"same_tokens": bool(torch.equal(a, b)), "shape": list(a.shape)}
    fn = run_ours if kind == "ours_generate" else run_hf
    fn()  # warm-up (first-call allocations, lazy imports)
    times = []
    for _ in range(size.get("runs", 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"s": min(times), "all": times}


def run_child(kind: str, arg: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--arg", arg, "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the table -----------------------------------------------------------------------------------


PAIRS = [  # (row, transformers kind, our kind, which checkpoint)
    ("load, single file", "hf_load", "ours_load", "llama"),
    ("load, sharded (500 MB)", "hf_load", "ours_load", "llama_sharded"),
    ("load + one forward", "hf_load_fwd", "ours_load_fwd", "llama"),
    ("save_pretrained (HF format)", "hf_save", "ours_save_hf", "llama"),
    ("native format: load", "hf_load", "ours_native", "native"),
    ("native format: load + one forward", "hf_load_fwd", "ours_native_fwd", "native"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_load", help="where the checkpoints go (not the repository)")
    parser.add_argument("--out", default=default_out("bench_load"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gen-runs", type=int, default=3, help="timed generate runs per process (best kept)")
    parser.add_argument("--skip", nargs="*", default=[], help="row names to skip (substring match)")
    parser.add_argument("--child"), parser.add_argument("--arg")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.arg, args.threads)))
        return
    size = "quick" if args.quick else "tinyllama"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import bench_load; bench_load.make_checkpoints(__import__('pathlib').Path({str(workdir)!r}), {size!r})"],
                   check=True)
    for folder in ("llama", "llama_sharded", "native"):  # warm the page cache for both sides alike
        for f in (workdir / folder).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
    results: dict = {"size": size, "threads": args.threads, "rows": {}}
    lines = [f"Checkpoint: {size} ({SIZES[size]}), bfloat16, {args.threads} threads, each number a fresh process; "
             f"median [range, n={args.repeats}].", "",
             "| row | transformers time | ours time | time ratio | transformers peak RSS | ours peak RSS | RSS ratio |",
             "|---|---|---|---|---|---|---|"]
    for row, theirs_kind, ours_kind, folder in PAIRS:
        if any(s in row for s in args.skip):
            continue
        theirs_arg = str(workdir / ("llama" if folder == "native" else folder))
        samples = {"theirs": [], "ours": []}
        for _ in range(args.repeats):
            samples["theirs"].append(run_child(theirs_kind, theirs_arg, args.threads))
            samples["ours"].append(run_child(ours_kind, str(workdir / folder), args.threads))
        t = {k: [s["s"] for s in v] for k, v in samples.items()}
        m = {k: [s["final_gb"] for s in v] for k, v in samples.items()}
        results["rows"][row] = samples
        lines.append(f"| {row} | {fmt(t['theirs'])} | {fmt(t['ours'])} | {ratio(t['ours'], t['theirs']):.2f}x | "
                     f"{fmt(m['theirs'], 'GB', 2)} | {fmt(m['ours'], 'GB', 2)} | {ratio(m['ours'], m['theirs']):.2f}x |")
        print(lines[-1], flush=True)
    if not any(s in "to_hf" for s in args.skip):
        conv = [run_child("ours_to_hf", str(workdir / "llama"), args.threads) for _ in range(args.repeats)]
        results["rows"]["to_hf"] = conv
        lines.append(f"| to_hf() after loading | n/a | {fmt([c['s'] for c in conv])} | | | "
                     f"{fmt([c['final_gb'] for c in conv], 'GB', 2)} (before: {fmt([c['before_gb'] for c in conv], 'GB', 2)}) | |")
        print(lines[-1], flush=True)
    if not any(s in "generate" for s in args.skip):
        gen = json.dumps({**GEN[size], "runs": args.gen_runs})
        check = run_child("gen_check", gen, args.threads)
        g = {"theirs": [], "ours": []}
        for _ in range(args.repeats):  # fresh processes, alternating; each: warm-up, then gen_runs timed runs
            g["theirs"].append(run_child("hf_generate", gen, args.threads)["s"])
            g["ours"].append(run_child("ours_generate", gen, args.threads)["s"])
        results["generate"] = {**g, **check}
        lines += ["", f"Generation ({GEN[size]}, float32, batch 4, 16-token prompts, greedy, KV cache, "
                  f"{args.threads} threads; same tokens: {check['same_tokens']}); per process the best of "
                  f"{args.gen_runs} runs after a warm-up: transformers {fmt(g['theirs'])}, ours {fmt(g['ours'])}, "
                  f"ratio of medians {ratio(g['ours'], g['theirs']):.2f}x, of minima {min(g['ours']) / min(g['theirs']):.2f}x."]
        print(lines[-1], flush=True)
    write(args.out, "\n".join(lines) + "\n")
    write(Path(args.out).with_suffix(".json"), json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
