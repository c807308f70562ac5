"""`hooked-bilinear circuits MODEL_DIR --target " happy" --out DIR`: a weight-based circuit report.

Writes DIR/report.md with, for the target direction (a token's logit, or a logit difference with
--target-b):

* what the weights say first: the context tokens whose presence pushes the target, through which
  heads and MLPs, and the token pairs that interact inside an MLP (`circuits.evidence`);
* per MLP layer: the eigenvalue spectrum of Q(u) (PNG), its effective rank, and the top
  eigenvectors read as tokens (direct path and the strongest head's OV path);
* the higher-order SVD singular values of every layer (PNG);
* a truncation sweep (loss / agreement as each MLP keeps k eigencomponents per HOSVD direction) on a
  few sequences sampled from the model itself, or random tokens (--samples random); labelled;
* the circuit graph from `circuits.find.find_circuit` (table, PNG, JSON).

Everything but the truncation sweep is computed from the weights alone (and the model reading one
token at a time). Tokens that never occur in the model's training text (its saved `token_counts`)
are left out of every table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .competitors import TYPICAL_COMPETITORS
from .evidence import CONTEXT_WINDOW, token_evidence
from .find import feature_tokens, find_circuit, target_direction
from .mlp import check_bilinear, check_layer, eigendecompose, hosvd
from .readout import normalized_embeddings
from .eigen import effective_rank
from .truncation import truncation_sweep

DENSE_SPECTRUM_MAX_D = 1024  # above this, plot only the top eigenvalues (matrix-free)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hooked-bilinear circuits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a saved model (save_pretrained folder, HF Llama or papers' checkpoint)")
    p.add_argument("--target", required=True, help='the token whose logit to explain, e.g. " happy" (an int id if the model has no tokenizer)')
    p.add_argument("--target-b", default=None, nargs="+",
                   help="explain the logit difference target - mean(target_b); several tokens allowed")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="MLP/attention layers to analyse (default all)")
    p.add_argument("--k", type=int, default=4, help="eigenvectors per MLP: shown per layer and kept per reader in the circuit")
    p.add_argument("--k-heads", type=int, default=4, help="heads kept per attention layer per reader in the circuit")
    p.add_argument("--threshold", type=float, default=0.02, help="least importance (fraction of the target) kept in the circuit")
    p.add_argument("--max-nodes", type=int, default=32, help="size cap of the circuit graph")
    p.add_argument("--n-tokens", type=int, default=8, help="top tokens shown per feature")
    p.add_argument("--samples", choices=("model", "random"), default="model",
                   help="truncation sweep inputs: sequences sampled from the model, or uniform random tokens")
    p.add_argument("--n-samples", type=int, default=4, help="sequences for the truncation sweep (0 skips it)")
    p.add_argument("--sample-len", type=int, default=32, help="length of each sequence (capped at n_ctx)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--sae-out", default=None, help="an SAE on an MLP's output (SAELens folder or the authors' "
                   "scope folder): adds the SAE-features section (exactness, the paper's top-k correlation metric)")
    p.add_argument("--sae-in", default=None, help="an SAE on the same MLP's input: adds the top input-feature interactions")
    p.add_argument("--out", default="circuits_report", help="output folder (created)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _token(model: Any, text: str) -> Any:
    """A token argument: a string for models with a tokenizer, an int id (digits) without one."""
    if model.tokenizer is None:
        if not text.strip().lstrip("-").isdigit():
            raise ValueError(f"the model has no tokenizer, so --target must be a token id, got {text!r}")
        return int(text)
    return text


def _plot(path: Path, draw) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _spectrum_plot(path: Path, values: Tensor, layer: int, full: bool) -> str:
    v = values.detach().float().cpu()

    def draw(ax):
        colors = ["#1f77b4" if x >= 0 else "#d62728" for x in v.tolist()]
        ax.bar(range(len(v)), v.abs().tolist(), color=colors, width=1.0)
        ax.set_yscale("log")
        ax.set_xlabel("eigenvector (by |eigenvalue|)")
        ax.set_ylabel("|eigenvalue| (blue +, red -)")
        ax.set_title(f"MLP {layer}: spectrum of Q(u)" + ("" if full else f" (top {len(v)})"), fontsize=9)
    return _plot(path, draw)


def _hosvd_plot(path: Path, spectra: dict[int, Tensor]) -> str:
    def draw(ax):
        for layer, s in spectra.items():
            s = s.detach().float().cpu()
            ax.plot(range(1, len(s) + 1), (s / s[0]).tolist(), label=f"MLP {layer}")
        ax.set_yscale("log")
        ax.set_xlabel("output singular direction")
        ax.set_ylabel("singular value / largest")
        ax.set_title("HOSVD of each MLP over the residual space", fontsize=9)
        ax.legend(fontsize=7)
    return _plot(path, draw)


def _fmt_tokens(pairs: Sequence[tuple[str, float]], n: int) -> str:
    return ", ".join(f"`{t!r}` {s:+.2f}" for t, s in pairs[:n]).replace("|", "\\|")


def _sample_tokens(model: Any, kind: str, n: int, length: int, seed: int) -> tuple[Tensor, str]:
    """[n, length] token ids for the truncation sweep, and a label saying where they came from."""
    length = max(2, min(length, model.cfg.n_ctx))
    g = torch.Generator().manual_seed(seed)
    if kind == "model":
        tok = model.tokenizer
        bos = None if tok is None else (tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
        if bos is not None:
            start = torch.full((n, 1), bos, dtype=torch.long)
        else:  # no start-of-text token: start from random tokens
            start = torch.randint(0, model.cfg.d_vocab, (n, 1), generator=g)
        tokens = model.generate(start, max_new_tokens=length - 1, do_sample=True, seed=seed,
                                stop_at_eos=False, return_type="tokens")
        return tokens, f"{n} sequences of {tokens.shape[1]} tokens sampled from the model (temperature 1, seed {seed})"
    tokens = torch.randint(0, model.cfg.d_vocab, (n, length), generator=g)
    return tokens, f"{n} sequences of {length} uniformly random tokens (seed {seed})"


@torch.no_grad()
def write_report(model: Any, target: Any, out: Path, layers: Optional[Sequence[int]] = None, k: int = 4,
                 k_heads: int = 4, threshold: float = 0.02, max_nodes: int = 32, n_tokens: int = 8,
                 samples: str = "model", n_samples: int = 4, sample_len: int = 32, seed: int = 0,
                 progress: bool = True, source: str = "", sae_out: Any = None, sae_in: Any = None) -> Path:
    """Write the report for `target` (see `circuits.find.target_direction`) into folder `out`;
    returns the path of report.md."""
    check_bilinear(model)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    all_layers = list(range(cfg.n_layers)) if layers is None else sorted({check_layer(model, l) for l in layers})
    u, read_at, description = target_direction(model, target)
    d = u / u.norm()
    mlp_layers = [l for l in all_layers if l < read_at]
    X = normalized_embeddings(model).to(d.dtype)
    steps = tqdm(total=len(mlp_layers) * 2 + 2, desc="circuit report", disable=not progress)
    counts = getattr(model, "token_counts", None)
    live_note = (f"{int((counts > 0).sum())} of {cfg.d_vocab} tokens occur in the training text; the others are "
                 "left out of every table." if counts is not None else
                 "The model has no token counts, so every token is shown (untrained tokens may appear).")
    md = [f"# Circuit report: {description}", "",
          f"Model: `{source}` (d_model {cfg.d_model}, d_mlp {cfg.d_mlp}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads, d_vocab {cfg.d_vocab}, norm {cfg.normalization_type}). {live_note}", "",
          "All results but the truncation sweep come from the weights alone (and the model reading one token "
          "at a time). Eigenvectors are input features of each MLP in its input space: "
          f"`blocks.l.hook_resid_mid / blocks.l.ln2.hook_scale` with ln2's gain folded into the MLP; the MLP "
          "writes `sum_i lambda_i (v_i . x)^2` along the target direction u. Eigenvector signs are arbitrary "
          "(here: the strongest read is positive).", ""]

    if read_at == cfg.n_layers and not isinstance(target, Tensor):
        ev = token_evidence(model, target)
        top_tok, top_val = ev.top_tokens(1)[0]
        head, lost = ev.carrier(top_tok)
        p = ev.attention[head]
        i = ev.labels.index(top_tok)
        rank = int((p > p[i]).sum()) + 1
        md += ["## What the weights say", "",
               f"**{top_tok!r} drives the target most** (evidence {top_val:+.2f} logits). It is carried by "
               f"**{head}** ({lost:+.2f} of it is lost when {head} cannot attend to it), which attends from the query "
               f"{ev.query!r} to {top_tok!r} with expected attention {float(p[i]):.2f} (mean over the offsets it may "
               f"sit at; rank {rank} of {p.numel()} keys).",
               "",
               "Evidence of a context token: what its presence adds to the target at the query, with every layer "
               f"computed from the weights in a virtual context (the query, the token, and {TYPICAL_COMPETITORS:g} "
               f"competitor tokens drawn independently, one at each other position of the window: by training frequency, or one time in "
               f"five from the tokens that usually sit just before the token -- each head's output averaged over the "
               f"draws; each head attends with the weight its QK circuit gives; every token but the query is seen "
               f"with typical text before it, drawn the same way), compared with the same context "
               f"without the token, averaged over the token sitting 1 to "
               f"{max(CONTEXT_WINDOW)} tokens before the query, one offset at a time, each weighted by how likely the "
               f"model's own view of text (the model after two tokens) puts it there. *Carried by*: the head whose blindness "
               "to the token loses most of that evidence. Tokens are ranked by evidence x plausibility (how likely the "
               f"model's own view of text makes the token among the {max(CONTEXT_WINDOW)} before the query; tokens that cannot "
               "be there score near 0). First-order routes: each head straight into the logits, "
               "and each MLP where the token meets the query's own residual and itself; 'chains and norms' is the "
               "rest. Pairs: what two tokens add *together* inside an MLP beyond what each adds alone (the "
               "bilinear interaction). Units: logit difference; see `circuits.evidence`.", "",
               ev.to_markdown(n=n_tokens), ""]

    md += ["## Eigenvalue spectra and top features", ""]
    for layer in mlp_layers:
        full = cfg.d_model <= DENSE_SPECTRUM_MAX_D
        eig = eigendecompose(model, layer, d, k=None if full else min(64, cfg.d_model))
        png = _spectrum_plot(out / f"spectrum_L{layer}.png", eig.values, layer, full)
        steps.update()
        rank = f"{float(effective_rank(eig.values.float())):.1f}" + ("" if full else " (of the top eigenvalues)")
        md += [f"### MLP {layer}", "", f"![spectrum of MLP {layer}]({png})", "",
               f"Effective rank `(sum|l| / sqrt(sum l^2))^2`: {rank}.", "",
               "| # | eigenvalue | direct path (+) | direct path (-) | best OV path | OV tokens (+) |", "|---|---|---|---|---|---|"]
        for i in range(min(k, eig.k)):
            v = eig.vectors[: cfg.d_model, i].to(d.dtype)
            if float((X @ v)[(X @ v).abs().argmax()]) < 0:
                v = -v
            direct, head, ov = feature_tokens(model, layer, v, n_tokens, X)
            md.append(f"| {i} | {float(eig.values[i]):+.4g} | {_fmt_tokens(direct.positive, n_tokens)} | "
                      f"{_fmt_tokens(direct.negative, n_tokens)} | {head} | {_fmt_tokens(ov.positive, n_tokens)} |")
        md.append("")
        steps.update()
    if not mlp_layers:
        md += ["(no MLP layer writes before the target is read)", ""]

    md += ["## Higher-order SVD", ""]
    spectra = {}
    for layer in all_layers:
        spectra[layer] = hosvd(model, layer).singular_values
    png = _hosvd_plot(out / "hosvd.png", spectra)
    md += [f"![HOSVD singular values]({png})", "",
           "Singular values of each MLP's interaction tensor flattened over output directions (the whole "
           "residual space), relative to the largest: a fast drop means a few output directions share "
           "most of the MLP's input features.", ""]
    steps.update()

    md += ["## Truncation sweep", ""]
    if n_samples > 0:
        tokens, label = _sample_tokens(model, samples, n_samples, sample_len, seed)
        ks = sorted({min(x, cfg.d_model) for x in (1, 2, 4, 8, 16)})
        rows = truncation_sweep(model, tokens.to(model.W_E.device), ks=ks, layers=all_layers, progress=progress)
        md += [f"Inputs: {label}. Every analysed MLP keeps only its top-k eigencomponents for each of its "
               "HOSVD output directions, and the model runs on with the truncated MLPs. This section runs the "
               "model on those inputs; it does not depend on the target (it measures how low-rank every MLP "
               "is), only on k and the inputs.", "",
               "| k | loss | original loss | top-1 agreement | KL | readout correlation |", "|---|---|---|---|---|---|"]
        md += [f"| {r.k} | {r.loss:.4f} | {r.original_loss:.4f} | {r.top1_agreement:.3f} | {r.kl:.4f} | "
               f"{r.readout_correlation:.4f} |" for r in rows]
        md += ["", f"Mean effective rank of the spectra: {rows[0].mean_effective_rank:.1f}.", ""]
    else:
        md += ["(skipped: --n-samples 0)", ""]

    graph = find_circuit(model, target, layers=all_layers, k_features=k, k_heads=k_heads,
                         threshold=threshold, max_nodes=max_nodes, n_tokens=n_tokens)
    graph.meta["source"] = source
    graph.to_json(out / "circuit.json")
    graph.draw(out / "circuit.png")
    steps.update()
    steps.close()
    md += ["## Circuit graph", "", "![circuit graph](circuit.png)", "",
           "Walked backward from the target (`circuits.find_circuit`). Node ids: `L1H0` is head 0 of layer 1 "
           "(its OV path), `L1.mlp.f2` the eigenvector of index 2 (by |eigenvalue|) of MLP 1's Q for the "
           "target, `L0.mlp.f0<L1H0` an eigenvector of MLP 0's Q for what L1H0 reads, `embed` the direct "
           "path. **weight**: the largest contribution of one context token through that component to its "
           "reader, in residual units -- comparable between components feeding the same reader, not between "
           "readers. **importance**: the fraction of the target it accounts for, multiplied down the walk "
           "(summed when a component feeds several readers). For heads, 'attends to' lists the keys it "
           f"prefers from the query `{graph.meta.get('query')!r}`; for MLP features, the best path pair. "
           f"Exact definition: {graph.meta['score']}.", "",
           graph.to_table(markdown=True, n_tokens=5), ""]
    if sae_out is not None:
        from .sae import load_sae
        from .sae_report import sae_report_section

        tokens, label = _sample_tokens(model, samples, max(n_samples, 16), sample_len, seed + 1)
        md += [sae_report_section(model, load_sae(sae_out), tokens.to(model.W_E.device),
                                  input_sae=None if sae_in is None else load_sae(sae_in)), "",
               f"(SAE section inputs: {label}.)", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from hooked_bilinear import HookedBilinearTransformer

    try:
        model = HookedBilinearTransformer.from_pretrained(args.model_dir, device=args.device)
        if model.cfg.act_fn == "silu" and model.cfg.gate_beta == 0.0:
            model.fold_zero_beta_gate()
        target = _token(model, args.target)
        if args.target_b is not None:
            target = (target, [_token(model, t) for t in args.target_b])
        path = write_report(model, target, Path(args.out), layers=args.layers, k=args.k, k_heads=args.k_heads,
                            threshold=args.threshold, max_nodes=args.max_nodes, n_tokens=args.n_tokens,
                            samples=args.samples, n_samples=args.n_samples, sample_len=args.sample_len,
                            seed=args.seed, progress=not args.quiet, source=str(args.model_dir),
                            sae_out=args.sae_out, sae_in=args.sae_in)
    except (ValueError, OSError) as e:  # bad targets; missing folders, run folders instead of models
        parser.error(str(e))
    print(f"circuit report written to {path} (plots and circuit.json alongside)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
