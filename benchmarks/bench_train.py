"""Training throughput: our bilinear model vs `transformers`' LlamaForCausalLM(hidden_act="linear").

Both models have the same size (bilinear MLP = Llama MLP with a linear "activation") and run in the
same loop (`training.loop.Trainer`: AdamW, clipping, accumulation, the same data), each in its own
spawned process so peak memory is measured per model; the two alternate for ``--rounds`` rounds so
background load hits both alike. Reports tokens/s as the median over every timed step of every round
(after warm-up steps), with the range of the per-step rates, and peak memory (CUDA: max allocated;
CPU: peak RSS growth over the process's RSS before the model was built; median over rounds). Ratios
divide medians by medians. Writes a markdown table to ``--out`` (default runs/benchmarks/bench_train.md,
untracked; pass benchmarks/results/bench_train.md to update the tracked one).

    python benchmarks/bench_train.py                  # small: 4 layers, d_model 256 (CPU friendly)
    python benchmarks/bench_train.py --size ts-medium # 6 layers, d_model 512, ctx 256, vocab 4096
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchstats import default_out, fmt, ratio, write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "small": dict(n_layers=4, d_model=256, n_heads=4, d_mlp=1024, n_ctx=256, d_vocab=4096),
    "ts-medium": dict(n_layers=6, d_model=512, n_heads=8, d_mlp=2048, n_ctx=256, d_vocab=4096),
}


def build(kind: str, size: dict):
    """(model, loss_fn) of the given kind and size, float32, same initial std."""
    if kind == "ours":
        from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer

        cfg = HookedBilinearConfig(n_layers=size["n_layers"], d_model=size["d_model"], n_heads=size["n_heads"],
                                   d_head=size["d_model"] // size["n_heads"], d_mlp=size["d_mlp"], n_ctx=size["n_ctx"],
                                   d_vocab=size["d_vocab"], act_fn="linear", seed=0)
        return HookedBilinearTransformer(cfg), lambda m, x: m(x, return_type="loss")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=size["d_vocab"], hidden_size=size["d_model"], intermediate_size=size["d_mlp"],
                      num_hidden_layers=size["n_layers"], num_attention_heads=size["n_heads"],
                      num_key_value_heads=size["n_heads"], max_position_embeddings=size["n_ctx"],
                      hidden_act="linear", tie_word_embeddings=False, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg), lambda m, x: m(input_ids=x, labels=x).loss


class Timer:
    """Callback: wall time of each optimizer step (synchronised on CUDA)."""

    def __init__(self):
        self.times: list[float] = []

    def _sync(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_start(self, trainer):
        self._sync()
        self.start = time.perf_counter()

    def on_step_end(self, trainer, metrics):
        self._sync()
        self.times.append(time.perf_counter() - self.start)


def rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if platform.system() == "Darwin" else 1024)


def current_rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return rss_mb()


def worker(kind: str, args: dict, queue) -> None:
    """Train `kind` for warmup + steps optimizer steps in a fresh process; put its numbers on `queue`."""
    sys.path.insert(0, str(REPO))
    import tempfile

    import torch
    from datasets import Dataset

    from training.loop import Trainer, make_accelerator
    from training.run_config import TrainConfig

    size = SIZES[args["size"]]
    torch.manual_seed(0)
    n_rows = args["batch"] * (args["steps"] + args["warmup"])
    rows = torch.randint(0, size["d_vocab"], (n_rows, size["n_ctx"]), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": rows.tolist()})
    base_rss = current_rss_mb()
    model, loss_fn = build(kind, size)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, batch_size=args["batch"], micro_batch_size=args["micro_batch"],
                      max_steps=args["steps"] + args["warmup"], eval_every=0, log_every=10**9, checkpoint_every=0,
                      mixed_precision=args["mixed_precision"], progress_bar=False)
    timer = Timer()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, cfg, data, None, run_dir=run_dir, accelerator=make_accelerator(cfg),
                          callbacks=[timer], loss_fn=loss_fn, seq_len=size["n_ctx"])
        trainer.train()
    steps_s = timer.times[args["warmup"]:]
    step_s = statistics.median(steps_s)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else rss_mb() - base_rss
    queue.put({"kind": kind, "params": n_params, "tokens_per_s": args["batch"] * size["n_ctx"] / step_s,
               "step_s": step_s, "steps_s": steps_s, "peak_mb": peak,
               "device": "cuda" if torch.cuda.is_available() else "cpu"})


def run_one(kind: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=worker, args=(kind, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per forward (default: --batch)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the models this many times; all steps pooled")
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--out", default=default_out("bench_train"), help="markdown table (default: untracked)")
    ns = parser.parse_args(argv)
    args = dict(size=ns.size, batch=ns.batch, micro_batch=ns.micro_batch or ns.batch, steps=ns.steps,
                warmup=ns.warmup, mixed_precision=ns.mixed_precision)

    rounds: dict[str, list[dict]] = {"ours": [], "hf-llama-linear": []}
    for _ in range(ns.rounds):  # alternate, so background load hits both alike
        for kind in rounds:
            r = run_one(kind, args)
            print(f"{kind:16s} {r['tokens_per_s']:10.0f} tok/s  step {r['step_s'] * 1e3:8.1f} ms  peak {r['peak_mb']:8.1f} MB")
            rounds[kind].append(r)
    tokens_per_step = args["batch"] * SIZES[ns.size]["n_ctx"]
    ours, hf = (pooled(rounds[k], tokens_per_step) for k in ("ours", "hf-llama-linear"))
    speed = ratio(ours["tok_s"], hf["tok_s"])
    mem = statistics.median(ours["peak_mb"]) / max(statistics.median(hf["peak_mb"]), 1e-9)
    print(f"ours {fmt(ours['tok_s'], 'tok/s', 0)}; hf {fmt(hf['tok_s'], 'tok/s', 0)}")
    print(f"ratio ours/hf (medians): tokens/s {speed:.2f}x, peak memory {mem:.2f}x")
    write_table(Path(ns.out), ns, args, ours, hf, speed, mem)
    return 0


def pooled(results: list[dict], tokens_per_step: int) -> dict:
    """Every timed step of every round of one model: per-step tokens/s and step times, peaks, metadata."""
    steps = [s for r in results for s in r["steps_s"]]
    return {"tok_s": [tokens_per_step / s for s in steps], "step_s": steps,
            "peak_mb": [r["peak_mb"] for r in results], "params": results[0]["params"], "device": results[0]["device"]}


def write_table(path: Path, ns, args: dict, ours: dict, hf: dict, speed: float, mem: float) -> None:
    s = SIZES[ns.size]
    mem_kind = "max CUDA allocated" if ours["device"] == "cuda" else "peak RSS growth"
    lines = [
        f"# Training step benchmark ({ns.size}, {ours['device']})", "",
        f"Model: {s['n_layers']} layers, d_model {s['d_model']}, {s['n_heads']} heads, d_mlp {s['d_mlp']}, "
        f"ctx {s['n_ctx']}, vocab {s['d_vocab']}; batch {args['batch']} x {s['n_ctx']} tokens "
        f"(micro-batch {args['micro_batch']}), mixed precision {args['mixed_precision']}; "
        f"{args['steps']} timed steps after {args['warmup']} warm-up, in each of {ns.rounds} alternating rounds: "
        f"median over all timed steps [range, n]. Same loop (`training.loop.Trainer`: AdamW, grad clipping) for both.", "",
        f"| model | params | tokens/s | step (ms) | peak memory (MB, {mem_kind}, median over rounds) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in (("hooked-bilinear (ours)", ours), ("LlamaForCausalLM(hidden_act=linear)", hf)):
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {fmt(r['tok_s'], '', 0)} | "
                     f"{fmt([t * 1e3 for t in r['step_s']], '', 1)} | {statistics.median(r['peak_mb']):.0f} |")
    lines += ["", f"Ratio ours / HF (median / median): tokens/s **{speed:.2f}x**, peak memory **{mem:.2f}x**.", ""]
    write(path, "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
