"""Benchmark of the weight-only circuits core: dense route vs ours, on random weights.

Run by hand:  python benchmarks/bench_circuits.py [--sizes ts-medium,tinyllama] [--quick]
Writes a markdown table to --out (default runs/benchmarks/bench_circuits.md, untracked; the
README's table is benchmarks/results/bench_circuits.md). Seconds are medians with the range of the
samples and their count ([min-max, n]): --repeats runs of the cheap rows (matmul, (a), the HOSVD
Gram route); the long (b) runs and the explicit HOSVD run once ([n=1]).

Rows per size:
  matmul           plain [1024, d] x [d, 2 d_mlp] GEMM in the same run (the machine's reference rate)
  (a) one direction, top-16 eigenpairs: dense (form Q + eigh) vs matrix-free block Lanczos
      (bf16 GEMMs + fp32 Rayleigh-Ritz; what method="auto" picks at large d) vs matrix-free
      single-vector Lanczos; errors: eigenvalues vs dense, and max ||Q v - lambda v|| / ||Q||
  (b) top-16 eigenvalues of every vocabulary direction: dense (measured on a few directions,
      extrapolated; fp64 eigvalsh, and a batched fp32 variant) vs batched Lanczos (fp32 and
      bf16 GEMMs, fixed default depth; measured on all directions or a subset and
      extrapolated -- the note column says which); error = max over a sample of directions
      of the relative error of the top-16 |lambda| vs dense fp64 eigvalsh. The "GEMM floor"
      row is the time the weight GEMMs alone would take at the bf16 matmul rate above.
  (c) HOSVD: Gram route vs explicit flattened (d_out, d^2) matrix (where it fits in memory)
Memory is the THEORETICAL peak of the arrays in flight (computed from shapes), not a measurement:
torch allocations are invisible to tracemalloc. The process-wide ru_maxrss is printed at the end.
GFLOP/s uses nominal flop counts (2mnk per GEMM; eigh counted as 9 d^3 with vectors, 4/3 d^3
values only) -- a rate, not a profiler reading.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchstats import default_out, fmt  # noqa: E402
from circuits import (eigendecompose_from_weights, hosvd_from_weights,  # noqa: E402
                      interaction_matrix_from_weights, topk_eigenvalues_many)
from circuits.eigen import default_krylov_steps  # noqa: E402

SIZES = {  # name: (d_model, d_mlp, d_vocab)
    "ts-medium": (512, 2048, 4096),
    "tinyllama": (2048, 5632, 32000),
}
K = 16
GB = 1e9


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


REPEATS = 3  # set from --repeats


def timed_n(f, n=None):
    """The last result and the seconds of each of ``n`` runs (default ``REPEATS``)."""
    secs = []
    for _ in range(n or REPEATS):
        out, t = timed(f)
        secs.append(t)
    return out, secs


def topk_abs(ev: torch.Tensor, k: int) -> torch.Tensor:
    """Magnitudes of the k largest-|lambda| eigenvalues, descending (rank-wise comparison)."""
    return ev.abs().sort(dim=-1, descending=True).values[..., :k]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((topk_abs(got, K) - topk_abs(ref, K)).abs() / topk_abs(ref, K)).max())


def fmt_mem(b):
    return f"{b / GB:.2f} GB" if b >= 0.1 * GB else f"{b / 1e6:.0f} MB"


def bench_size(name, quick, rows, n_sub, n_exact, n_sub32):
    d, m, vocab = SIZES[name]
    g = torch.Generator().manual_seed(0)
    W = dict(W_gate=torch.randn(d, m, generator=g) / d ** 0.5,
             W_in=torch.randn(d, m, generator=g) / d ** 0.5,
             W_out=torch.randn(m, d, generator=g) / m ** 0.5)
    U = torch.randn(vocab, d, generator=g)
    f4 = 4

    def row(task, method, secs, gflop, mem, err="", note=""):
        samples = secs if isinstance(secs, list) else [secs]
        med = statistics.median(samples)
        rate = f"{gflop / med:.0f}" if gflop and med == med and med else ""  # from the median
        shown = fmt(samples, "", 2).replace("  ", " ") if med == med else "not run"
        rows.append([name, task, method, shown, rate, mem, err, note])
        print(" | ".join(rows[-1]), flush=True)

    # Reference GEMM rate, same shapes as the matrix-free step.
    rate = {}
    for dt, lab in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        X, Wc = torch.randn(1024, d).to(dt), torch.randn(d, 2 * m).to(dt)
        X @ Wc
        _, s = timed_n(lambda: X @ Wc, max(3, REPEATS))
        rate[lab] = 2 * 1024 * d * 2 * m / GB / statistics.median(s)
        row("matmul", f"[1024,{d}]x[{d},{2 * m}] {lab}", s, 2 * 1024 * d * 2 * m / GB,
            fmt_mem((1024 * d + d * 2 * m + 1024 * 2 * m) * X.element_size()))

    # Warm-up: the first LAPACK eigh call in a process pays a one-time cost of seconds.
    for dt in (torch.float32, torch.float64):
        Z = torch.randn(d, d, dtype=dt)
        torch.linalg.eigh(Z + Z.T)
        torch.linalg.eigvalsh(Z + Z.T)
    eigendecompose_from_weights(u=U[1], k=K, method="lanczos", max_steps=2 * K, **W)
    eigendecompose_from_weights(u=U[1], k=K, method="block", max_steps=2, **W)

    # (a) one direction, top-16 eigenpairs.
    u = U[0]
    dense, s_dense = timed_n(lambda: eigendecompose_from_weights(u=u, k=K, method="dense", **W))
    row("(a) 1 dir top-16 eigenpairs", "dense: form Q + eigh", s_dense,
        (2 * d * d * m + 9 * d ** 3) / GB, fmt_mem(f4 * (2 * d * m + 3 * d * d)), "ref")
    Q0 = interaction_matrix_from_weights(u=u, **W)
    qn = float(dense.values.abs().max())
    blk_steps = -(-min(d, 24 * K) // 16)
    blk, s_blk = timed_n(lambda: eigendecompose_from_weights(u=u, k=K, method="block", **W))
    resid = float(((Q0 @ blk.vectors - blk.vectors * blk.values).norm(dim=0) / qn).max())
    row("(a) 1 dir top-16 eigenpairs",
        f"block Lanczos, 16 x {blk_steps} steps bf16 + fp32 Rayleigh-Ritz (auto)", s_blk,
        (blk_steps * 16 + 2 * K) * 8 * d * m / GB,
        fmt_mem(2 * d * 2 * m + f4 * 2 * blk_steps * 16 * d),
        f"{rel_err(blk.values, dense.values):.1e}; resid {resid:.1e}")
    lan, s_lan = timed_n(lambda: eigendecompose_from_weights(u=u, k=K, method="lanczos", **W))
    steps_a = min(d, max(12 * K + 100, 4 * int(d ** 0.5)))
    row("(a) 1 dir top-16 eigenpairs", f"single-vector Lanczos fp32 (<= {steps_a} steps)", s_lan,
        steps_a * 8 * d * m / GB, fmt_mem(f4 * (steps_a * d + 2 * d * m)),
        f"{rel_err(lan.values, dense.values):.1e}")

    # (b) every vocabulary direction, top-16 eigenvalues.
    ev_ex, s_ex, s_form = [], 0.0, 0.0
    for i in range(n_exact):  # one at a time: memory stays at one d x d matrix
        Qi, sf = timed(lambda: interaction_matrix_from_weights(u=U[i], **W))
        e, se = timed(lambda: torch.linalg.eigvalsh(Qi.double()))
        ev_ex.append(e)
        s_ex, s_form = s_ex + se, s_form + sf
    ev_ex = torch.stack(ev_ex)
    per = (s_ex + s_form) / n_exact
    row(f"(b) {vocab} dirs top-16 eigenvalues", "dense: form Q + eigvalsh (fp64)", per * vocab,
        vocab * (2 * d * d * m + 4 / 3 * d ** 3) / GB, fmt_mem(8 * d * d),
        "ref", f"EXTRAPOLATED from {n_exact} dirs")
    # Dense, batched: Q for a chunk of directions with bf16 GEMMs, then batched fp32 eigvalsh.
    nb = min(n_exact, 8)

    def dense_batched():
        C = U[:nb] @ W["W_out"].T
        Ab = (W["W_gate"][None] * C[:, None, :]).bfloat16()
        M = (Ab @ W["W_in"].T.bfloat16()).float()
        return torch.linalg.eigvalsh(0.5 * (M + M.transpose(-1, -2)))
    evb, s_db = timed(dense_batched)
    row(f"(b) {vocab} dirs top-16 eigenvalues", "dense batched: bf16 GEMM form + eigvalsh (fp32)",
        s_db * vocab / nb, vocab * (2 * d * d * m + 4 / 3 * d ** 3) / GB,
        fmt_mem(nb * (f4 * 2 * d * d + 2 * d * m)), f"{rel_err(evb, ev_ex[:nb]):.1e} (max over {nb})",
        f"EXTRAPOLATED from {nb} dirs")
    steps = default_krylov_steps(d, K)
    chunk = 256
    for dt, lab in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        n_run = n_sub if lab == "bf16" else n_sub32
        n = vocab if n_run is None else min(n_run, vocab)
        vals, s = timed(lambda: topk_eigenvalues_many(U=U[:n], k=K, compute_dtype=dt, stall_tol=None,
                                                       chunk=chunk, **W))
        ne = min(n, n_exact)
        err = rel_err(vals[:ne], ev_ex[:ne])
        bb = 2 if lab == "bf16" else 4
        mem = chunk * (steps + 32) * d * bb + chunk * 2 * (2 * m) * bb + chunk * 3 * d * f4 + d * 2 * m * bb
        label = "measured, all" if n == vocab else f"EXTRAPOLATED from {n} dirs"
        row(f"(b) {vocab} dirs top-16 eigenvalues", f"batched Lanczos {lab} ({steps} steps, chunk {chunk})",
            s * vocab / n, vocab * steps * 8 * d * m / GB, fmt_mem(mem),
            f"{err:.1e} (max over {ne})", label)
    floor = vocab * steps * 8 * d * m / GB / rate["bf16"]
    row(f"(b) {vocab} dirs top-16 eigenvalues", f"GEMM floor: {steps} steps x 8 d d_mlp at the bf16 matmul rate",
        floor, vocab * steps * 8 * d * m / GB, "", "", "lower bound for this method, not a run")

    # (c) HOSVD over all residual directions (U = identity).
    h, s_h = timed_n(lambda: hosvd_from_weights(**W))
    row("(c) HOSVD (all d_model outputs)", "Gram route", s_h,
        (3 * 2 * m * m * d + 2 * m * m * d + 2 * m * d * d + 9 * d ** 3) / GB,
        fmt_mem(f4 * (4 * m * m + 2 * d * m) + 8 * 3 * d * d))
    flat_bytes = d * d * d * f4
    if flat_bytes <= 2 * GB and not quick:
        def explicit():
            F = interaction_matrix_from_weights(u=torch.eye(d), **W).flatten(1)
            return torch.linalg.svdvals(F)  # rows: d outputs, cols: d^2
        S, s_x = timed(explicit)
        err = float(((S - h.singular_values).abs() / S[0]).max())
        row("(c) HOSVD (all d_model outputs)", "explicit flattened (d, d^2) SVD", s_x,
            (d * 2 * d * d * m + 4 * d * d * d * d) / GB, fmt_mem(2 * flat_bytes),
            f"{err:.1e} (Gram vs explicit)")
    else:
        row("(c) HOSVD (all d_model outputs)", "explicit flattened (d, d^2) SVD", float("nan"), 0,
            fmt_mem(flat_bytes), "", "not run: flattened tensor too big" if flat_bytes > 2 * GB
            else "skipped (--quick)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="ts-medium,tinyllama")
    p.add_argument("--quick", action="store_true", help="small subsets, skip the explicit HOSVD")
    p.add_argument("--subset", type=int, default=512,
                   help="directions measured for (b) at sizes whose full run is long (tinyllama)")
    p.add_argument("--exact", type=int, default=8,
                   help="directions checked against dense fp64 eigvalsh at large sizes")
    p.add_argument("--repeats", type=int, default=3, help="runs of each cheap row (median and range reported)")
    p.add_argument("--out", default=default_out("bench_circuits"), help="markdown table (default: untracked)")
    a = p.parse_args()
    global REPEATS
    REPEATS = a.repeats
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows = []
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    for name in a.sizes.split(","):
        if name not in SIZES:
            p.error(f"unknown size {name!r}; choose from {', '.join(SIZES)}")
        big = SIZES[name][0] >= 1024
        n_sub = (64 if a.quick else a.subset) if big else (512 if a.quick else None)
        n_sub32 = 64 if big else (256 if a.quick else None)  # fp32 Lanczos: the slower variant
        n_exact = (3 if a.quick else a.exact) if big else 32
        bench_size(name, a.quick, rows, n_sub, n_exact, n_sub32)
    head = ["size", "task", "method", "seconds: median [range, n]", "GFLOP/s (nominal)", "memory in flight (theoretical)",
            "max rel. error of top-16 |lambda|", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    meta = (f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs; random weights; "
            f"k = 16; process peak RSS {rss:.1f} GB (whole run, all sizes); "
            f"1-min load average at start/end {load0:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} "
            f"cores (other jobs may share this machine: timings are noisy); "
            f"whole benchmark {time.perf_counter() - t_start:.0f} s wall; "
            f"{time.strftime('%Y-%m-%d %H:%M')}; flags: {' '.join(sys.argv[1:]) or '(none)'}")
    text = "# bench_circuits\n\n" + meta + "\n\n" + "\n".join(lines) + "\n"
    print("\n" + text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
