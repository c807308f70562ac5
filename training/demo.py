"""The README's main job, end to end and offline:

1. generate the built-in story corpus and train the tiny bilinear model on it (configs/tinystories-tiny.yaml);
2. load the saved model and decompose its residual stream on a story prompt (run_with_cache);
3. write a weight-only circuit report for a planted rule (an object determines its verb);
4. print where everything went.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tinystories-tiny.yaml"


def decompose(model_dir: Path, prompt: str) -> None:
    from hooked_bilinear import HookedBilinearTransformer

    model = HookedBilinearTransformer.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        logits, cache = model.run_with_cache(prompt)
    top = int(logits[0, -1].argmax())
    print(f"\nprompt {prompt!r} -> next token {model.to_string([top])!r}")
    parts, labels = cache.decompose_resid(return_labels=True, pos_slice=-1)
    attrs = cache.logit_attrs(parts, tokens=torch.tensor([top]), pos_slice=-1)
    print("direct logit attribution of each component at the last position:")
    for label, value in zip(labels, attrs[:, 0].tolist()):
        print(f"  {label:>12}: {value:+.3f}")
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, -1]
    error = (parts.sum(0) - final).abs().max().item()
    print(f"components sum to the final residual: max |error| = {error:.1e}")


def _same_finished_run(run_dir: Path, overrides: list[str]) -> bool:
    """Whether ``run_dir`` holds a finished run made with exactly the demo's config and these overrides."""
    import yaml

    from training.run_config import RunConfigError, build_run_config, load_run_config

    try:
        saved = build_run_config(yaml.safe_load((run_dir / "run_config.yaml").read_text()) or {})
        wanted = load_run_config(CONFIG, overrides)
    except (OSError, yaml.YAMLError, RunConfigError):
        return False
    return saved.to_dict() == wanted.to_dict() and (run_dir / "final" / "config.json").is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hooked-bilinear demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="where the run, the model and the report go")
    parser.add_argument("--steps", type=int, default=None, help="override the tiny config's training steps")
    parser.add_argument("--target", default=" kicked", help="verb whose circuit (its logit minus the other verbs') the report explains")
    parser.add_argument("--overwrite", action="store_true", help="replace the demo run already in --out")
    args = parser.parse_args(argv)

    from circuits.report import main as circuits_report
    from training.run_folder import run_contents
    from training.train import main as train

    out = Path(args.out)
    overrides = [f"run.out_dir={out / 'run'}"] + ([f"train.max_steps={args.steps}"] if args.steps else [])
    if run_contents(out / "run") and not args.overwrite:  # never replace a run silently, the demo's included
        if not _same_finished_run(out / "run", overrides):
            print(f"hooked-bilinear demo: {out / 'run'} already holds a different or unfinished run; rerun with "
                  "`hooked-bilinear demo --overwrite` to replace it, or choose another --out", file=sys.stderr)
            return 2
        print(f"{out / 'run'} already holds this demo's finished run: reusing it (--overwrite retrains)")
    else:
        status = train(["--config", str(CONFIG), *overrides, *(["--overwrite"] if args.overwrite else [])])
        if status:
            return status
    model_dir = out / "run" / "final"
    decompose(model_dir, "Tom found a red ball. He")
    from training.stories import OBJECT_VERBS

    others = [f" {v}" for v in OBJECT_VERBS.values() if f" {v}" != args.target]
    status = circuits_report([str(model_dir), "--target", args.target, "--target-b", *others, "--out", str(out / "circuits")])
    print(f"\ndone: trained model in {model_dir}, samples in {out / 'run' / 'samples.txt'}, "
          f"circuit report in {out / 'circuits' / 'report.md'}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
