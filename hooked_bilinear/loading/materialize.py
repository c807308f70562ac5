"""Building a model around checkpoint tensors, with no weight allocated twice.

Every loader goes: config -> `empty_model(cfg)` (parameters on the meta device: no memory, no
random initialisation; the small derived buffers such as rotary tables are real) -> a state dict
of checkpoint tensors under our names -> `fill_model` (each tensor cast to the model's dtype and
moved to its device one at a time, then *assigned* as the parameter, not copied into one).

What that costs:
* CPU, checkpoint dtype == requested dtype: nothing. The tensors are memory-mapped views of the
  weight files (copy-on-write), and a Hugging Face `[out, in]` matrix becomes our `[in, out]`
  parameter as a transposed view, so parameters may be non-contiguous; every torch operation
  accepts that (`x @ W` reads a transposed matrix as fast as a contiguous one).
* CPU, another dtype: one converted tensor per parameter (no float32 detour, no staging copy).
* Accelerator: each tensor goes straight from the file to the device (`read_weights(device=...)`)
  and is made contiguous there; the CPU never holds the model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import torch
from torch import Tensor

from ..config import HookedBilinearConfig
from .checks import check_state_dict

_SKELETON: Optional[type] = None
_BLOCK = re.compile(r"^blocks\.\d+\.")


def _skeleton_class() -> type:
    """HookedBilinearTransformer without its random initialisation: a loader overwrites every
    parameter anyway, and on the meta device there is nothing to initialise."""
    global _SKELETON
    if _SKELETON is None:
        from ..model import HookedBilinearTransformer

        class _Skeleton(HookedBilinearTransformer):
            def init_weights(self) -> None:  # noqa: D102 - skipped on purpose, see above
                pass

        _SKELETON = _Skeleton
    return _SKELETON


def empty_model(cfg: HookedBilinearConfig, tokenizer: Any = None) -> Any:
    """A `HookedBilinearTransformer` whose parameters live on the meta device (shapes and dtypes
    only). Buffers are real and on the CPU; `fill_model` moves them to `cfg.device`."""
    from accelerate import init_empty_weights

    from ..model import HookedBilinearTransformer

    skeleton = _skeleton_class()
    device, cfg.device = cfg.device, None  # __init__ would move meta parameters to the device
    try:
        with init_empty_weights(include_buffers=True):  # everything on meta: nothing computed
            model = skeleton(cfg, tokenizer=tokenizer)
        # The derived buffers (rotary tables) are the same in every block: compute them once, in
        # a one-block model, and share them (they are read-only and never saved).
        donor_cfg = dataclasses.replace(cfg, n_layers=1)
        donor_cfg.device = None  # after __post_init__, which may fill in a default device
        with init_empty_weights(include_buffers=False):
            donor = skeleton(donor_cfg)
    finally:
        cfg.device = device
    donor_buffers = dict(donor.named_buffers())
    for name, _ in list(model.named_buffers()):
        module_name, _, leaf = name.rpartition(".")
        source = _BLOCK.sub("blocks.0.", name)
        if source not in donor_buffers:  # cannot happen while blocks are built from one config
            raise RuntimeError(f"no buffer {source!r} to fill {name!r} with")
        model.get_submodule(module_name)._buffers[leaf] = donor_buffers[source]
    model.__class__ = HookedBilinearTransformer  # same layout; only init_weights differed
    return model


@torch.no_grad()
def fill_model(model: Any, state_dict: dict[str, Tensor], source: str) -> Any:
    """Check `state_dict` against `model` (every name and shape, errors naming `source`), then make
    each tensor the model's parameter in `cfg.dtype` on `cfg.device`. Returns the model in eval mode.

    Consumes `state_dict` (emptied as it goes, so a tensor replaced by a converted or contiguous
    copy is freed at once: peak memory is the model plus one tensor). The model may share memory
    with the tensors it was given (no copy is made when dtype and device match)."""
    check_state_dict(model, state_dict, source)
    cfg = model.cfg
    device = torch.device(cfg.device if cfg.device is not None else "cpu")
    ready: dict[str, Tensor] = {}
    for name in list(state_dict):
        tensor = state_dict.pop(name).detach().to(device=device, dtype=cfg.dtype)
        if device.type != "cpu":
            # Device memory is not memory-mapped; a contiguous layout there is what fused kernels
            # and optimizers (fused AdamW, DDP buckets) prefer, and costs one tensor at a time.
            tensor = tensor.contiguous()
        ready[name] = tensor
    model.load_state_dict(ready, strict=True, assign=True)
    model.to(device)  # the buffers; parameters are already there
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:  # check_state_dict makes this impossible; a guard against a silent half-loaded model
        raise RuntimeError(f"parameters left unloaded: {left}")
    return model.eval()
