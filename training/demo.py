"""The README's main job: build a small bilinear model, cache a run, decompose the residual stream."""

from __future__ import annotations

import argparse

import torch

from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hooked-bilinear demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = HookedBilinearConfig(d_model=128, d_head=32, n_layers=2, n_ctx=64, d_vocab=512, seed=args.seed)
    model = HookedBilinearTransformer(cfg)
    tokens = torch.randint(0, cfg.d_vocab, (1, 16), generator=torch.Generator().manual_seed(args.seed))
    logits, cache = model.run_with_cache(tokens)
    print(f"model: {cfg.n_layers} layers, d_model {cfg.d_model}, bilinear MLPs (d_mlp {cfg.d_mlp}); "
          f"{len(cache)} activations cached")

    parts, labels = cache.decompose_resid(return_labels=True)
    final = cache["blocks.1.hook_resid_post"]
    print("\nresidual stream at the last position, by component (norm, share of final norm):")
    for label, part in zip(labels, parts):
        norm = part[0, -1].norm().item()
        print(f"  {label:>12}: {norm:8.4f}  ({norm / final[0, -1].norm().item():.2f})")
    error = (parts.sum(0) - final).abs().max().item()
    print(f"\nsum of components - final residual: max |error| = {error:.2e}")

    target = int(logits[0, -1].argmax())
    attrs = cache.logit_attrs(parts[:, :, -1], tokens=torch.tensor([target]), pos_slice=-1)
    print(f"direct logit attribution to the top prediction (token {target}):")
    for label, value in zip(labels, attrs[:, 0].tolist()):
        print(f"  {label:>12}: {value:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
