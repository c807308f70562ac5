"""Finetuning throughput at full TinyLlama size: tokens/s, peak memory, projected time for 400M tokens.

A random-weight ``HookedBilinearTransformer`` with TinyLlama's shape (22 layers, d_model 2048, 32/4
heads, d_mlp 5632, vocab 32000, 1.1B parameters; act_fn silu with the beta gate) runs a few steps
through the finetuning loop (``training.loop.Trainer`` + ``training.beta_schedule.BetaSchedule``,
AdamW, clipping, accumulation) on random tokens, in bf16 autocast over float32 master weights.

    python benchmarks/bench_finetune.py                          # GPU, full size, ctx 2048, micro 4, checkpointing
    python benchmarks/bench_finetune.py --no-checkpointing --micro 8
    python benchmarks/bench_finetune.py --small                  # CPU: 2 layers, d_model 256, ctx 256

Reports the median step time over the timed steps (after warm-up) with their range, tokens/s from
that median, peak memory (CUDA: max allocated and reserved; CPU: peak RSS) and the projected wall time
of the 400M-token recipe on this device; appends a markdown row to ``--out`` (default
runs/benchmarks/bench_finetune.md, untracked; the tracked table is benchmarks/results/bench_finetune.md).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchstats import default_out, fmt  # noqa: E402

FULL = dict(n_layers=22, d_model=2048, n_heads=32, n_key_value_heads=4, d_mlp=5632, d_vocab=32000, n_ctx=2048)
SMALL = dict(n_layers=2, d_model=256, n_heads=8, n_key_value_heads=2, d_mlp=704, d_vocab=4096, n_ctx=256)
RECIPE_TOKENS = 400_000_000


class Timer:
    def __init__(self, cuda: bool):
        self.cuda, self.times = cuda, []

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def on_step_start(self, trainer):
        self._sync()
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer, metrics):
        self._sync()
        self.times.append(time.perf_counter() - self.t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a small model on the CPU")
    p.add_argument("--micro", type=int, default=None, help="micro-batch size (default 4 full, 4 small)")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--out", default=default_out("bench_finetune"), help="markdown table (default: untracked)")
    args = p.parse_args(argv)

    import torch
    from datasets import Dataset

    from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer
    from training.beta_schedule import BetaConfig, BetaSchedule
    from training.loop import Trainer, make_accelerator
    from training.run_config import TrainConfig

    cuda = torch.cuda.is_available() and not args.small
    size = SMALL if args.small else FULL
    seq_len = args.seq_len or size["n_ctx"]
    micro = args.micro or 4
    ckpt = not args.no_checkpointing
    cfg = HookedBilinearConfig(**size, d_head=size["d_model"] // size["n_heads"], act_fn="silu", gate_beta=1.0,
                               seed=0, device="cuda" if cuda else "cpu")
    model = HookedBilinearTransformer(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    rows = Dataset.from_dict({"input_ids": torch.randint(0, size["d_vocab"], (micro * args.accum * (args.steps + 1), seq_len),
                                                         generator=torch.Generator().manual_seed(0)).tolist()})
    train = TrainConfig(lr=2e-4, warmup_steps=1, batch_size=micro * args.accum, micro_batch_size=micro,
                        max_steps=args.steps, mixed_precision="bf16" if cuda else "no", gradient_checkpointing=ckpt,
                        eval_every=0, log_every=1, progress_bar=False)
    timer = Timer(cuda)
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, train, rows, run_dir=run_dir, accelerator=make_accelerator(train), seq_len=seq_len,
                          callbacks=[BetaSchedule(BetaConfig(anneal_fraction=1.0)), timer])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    timed = timer.times[args.warmup:] or timer.times
    step_s = statistics.median(timed)
    tokens_per_step = micro * args.accum * seq_len
    tok_s = tokens_per_step / step_s
    if cuda:
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved"
        device = torch.cuda.get_device_name()
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if platform.system() == "Darwin" else 2**10)
        peak = f"{rss / 1024:.2f} GiB peak RSS"
        device = f"CPU ({torch.get_num_threads()} threads)"
    hours = RECIPE_TOKENS / tok_s / 3600
    row = (f"| {device} | {n_params / 1e6:.0f}M | {seq_len} | {micro} x {args.accum} | {'yes' if ckpt else 'no'} | "
           f"{'bf16' if cuda else 'fp32'} | {fmt(timed, 's', 2)} | {tok_s:,.0f} | {peak} | {hours:,.1f} h |")
    print(f"{n_params / 1e6:.1f}M parameters on {device}: step {fmt(timed, 's', 3)} (median [range, n]), "
          f"{tok_s:,.0f} tokens/s, peak {peak}; 400M tokens would take {hours:,.1f} h on this device")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# bench_finetune: TinyLlama-shaped finetuning steps (random weights, beta gate)\n\n"
                       "| device | params | ctx | micro x accum | grad ckpt | precision | step: median [range, n] | tokens/s (from the median) | peak memory | 400M tokens (this model, this device) |\n"
                       "|---|---|---|---|---|---|---|---|---|---|\n")
    with open(out, "a") as f:
        f.write(row + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
