"""Sparse autoencoders as the inputs and outputs of a bilinear MLP, mapped into the space Q lives in.

Q(u) of the MLP of layer l acts on `x = blocks.{l}.hook_resid_mid / blocks.{l}.ln2.hook_scale`
(centred first for LN; DESIGN.md section 5), with ln2's gain (and LN bias) folded into W_gate/W_in
(`circuits.mlp_weights`). An SAE reads some hook point `a`; this module says how `a` relates to x:

* output side: an SAE on `blocks.{l}.hook_mlp_out` has pre-activation `pre_j = a . E_j + c_j` with
  `a = mlp(x)`, so `pre_j = x^T Q(E_j) x + c_j` exactly: its (effective) encoder columns `E_j` are
  output directions u. On `hook_resid_post` (or the next layer's `hook_resid_pre`) the MLP part is
  the same and `resid_mid . E_j` is added on top.
* input side: `blocks.{l}.ln2.hook_normalized` is x itself (before the gain, as in TransformerLens),
  so an SAE there needs no mapping: Q already has the gain folded in. The authors' `mlp_in` point is
  the norm's output *after* its gain, `a = x * g + b_ln`: rows map to x-space as `d / g`, the decoder
  bias as `(b_dec - b_ln) / g`. An SAE on `blocks.{l}.hook_resid_mid` (or `hook_mlp_in`) reads
  `a = scale * x` (+ the mean, for LN): its (centred) rows are x-space rows up to the positive
  per-position factor `1 / scale`.

SAEs come as SAELens `SAE` objects, SAELens saved folders (`cfg.json` + `sae_weights.safetensors`,
read with SAELens itself), the authors' `tdooms/<model>-scope` TopK folders (`config.json` +
`model.safetensors`), or a plain `(W_enc, b_enc, W_dec, b_dec)` tuple with a hook name. Everything
becomes an `SAEWeights` (plain tensors, SAELens shapes) before any math.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .mlp import check_layer

__all__ = ["SAEWeights", "OutputFeatures", "InputBasis", "load_sae", "load_scope_sae", "scope_hook_name",
           "output_features", "input_basis"]

# The authors' hook points ("point" in their config; their code writes "-" or "_") in this project's names.
SCOPE_POINTS = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "mlp_in": "blocks.{l}.ln2.hook_normalized",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "attn_out": "blocks.{l}.hook_attn_out",
}


@dataclass
class SAEWeights:
    """One SAE as plain tensors (SAELens shapes and conventions).

    pre-activation (what SAELens's `hook_sae_acts_pre` shows):
        pre(a) = (a / input_scale - b_dec * apply_b_dec_to_input) @ W_enc + b_enc     [..., d_sae]
    reconstruction: a_hat = (f @ W_dec + b_dec) * input_scale                            [..., d_in]
    `input_scale` is the scope format's constant `normalize` (1 for SAELens). With
    `rescale_acts_by_decoder_norm` (SAELens TopK) the activations are `pre * |W_dec_j|` and decode
    divides by it again, so `decoder_affine` has rows `W_dec_j / |W_dec_j|`.
    """

    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    hook_name: str
    architecture: str = "standard"  # "standard" | "topk" | "jumprelu" | ...
    k: Optional[int] = None  # TopK
    threshold: Optional[Tensor] = None  # JumpReLU, [d_sae]
    apply_b_dec_to_input: bool = True
    input_scale: float = 1.0
    source: str = ""  # where it came from, for reports
    # The authors' "mlp_in" is the norm's output after its gain; ln2.hook_normalized here is before it.
    reads_gained_norm_output: bool = False
    rescale_acts_by_decoder_norm: bool = False

    def __post_init__(self) -> None:
        d_in, d_sae = self.W_enc.shape if self.W_enc.ndim == 2 else (None, None)
        if self.W_enc.ndim != 2 or self.W_dec.shape != (d_sae, d_in):
            raise ValueError(
                f"SAE weights must be W_enc [d_in, d_sae] and W_dec [d_sae, d_in] (SAELens convention); got "
                f"W_enc {tuple(self.W_enc.shape)}, W_dec {tuple(self.W_dec.shape)}. A torch Linear stores its "
                "weight transposed: pass W_enc=linear.weight.T")
        if self.b_enc.shape != (d_sae,) or self.b_dec.shape != (d_in,):
            raise ValueError(f"b_enc must be [d_sae={d_sae}] and b_dec [d_in={d_in}]; got "
                             f"{tuple(self.b_enc.shape)}, {tuple(self.b_dec.shape)}")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def layer(self) -> int:
        return hook_layer(self.hook_name)

    def encoder_affine(self) -> tuple[Tensor, Tensor]:
        """(E [d_in, d_sae], c [d_sae]) with pre(a) = a @ E + c exactly."""
        shift = self.b_dec @ self.W_enc if self.apply_b_dec_to_input else torch.zeros_like(self.b_enc)
        return self.W_enc / self.input_scale, self.b_enc - shift

    def decoder_affine(self) -> tuple[Tensor, Tensor]:
        """(D [d_sae, d_in], b [d_in]) with a_hat = f @ D + b exactly, f = `encode(a)`."""
        W_dec = self.W_dec / self._decoder_norm()[:, None] if self.rescale_acts_by_decoder_norm else self.W_dec
        return W_dec * self.input_scale, self.b_dec * self.input_scale

    def _decoder_norm(self) -> Tensor:
        return self.W_dec.norm(dim=-1)

    def pre_activation(self, a: Tensor) -> Tensor:
        """a [..., d_in] -> pre-activations [..., d_sae], computed as the SAE itself does."""
        a = a.to(self.W_enc.dtype) / self.input_scale
        if self.apply_b_dec_to_input:
            a = a - self.b_dec
        return a @ self.W_enc + self.b_enc

    def encode(self, a: Tensor) -> Tensor:
        """Feature activations [..., d_sae] (TopK keeps the k largest, then ReLU, as SAELens does)."""
        pre = self.pre_activation(a)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self._decoder_norm()
        if self.architecture in ("topk", "batchtopk") and self.k is not None:
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        acts = pre.relu()
        if self.threshold is not None:
            acts = acts * (pre > self.threshold)
        return acts

    def decode(self, f: Tensor) -> Tensor:
        D, b = self.decoder_affine()
        return f.to(D.dtype) @ D + b

    def to(self, dtype: torch.dtype) -> "SAEWeights":
        cast = lambda t: None if t is None else t.to(dtype)
        return replace(self, W_enc=cast(self.W_enc), b_enc=cast(self.b_enc), W_dec=cast(self.W_dec),
                       b_dec=cast(self.b_dec), threshold=cast(self.threshold))


def hook_layer(hook_name: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook_name or "")
    if m is None:
        raise ValueError(f"cannot tell the layer of hook {hook_name!r}: expected 'blocks.<layer>.<hook>'")
    return int(m.group(1))


# --- loading ---------------------------------------------------------------------------------------

SAELike = Union["SAEWeights", Any, str, Path, tuple]


def load_sae(sae: SAELike, hook_name: Optional[str] = None) -> SAEWeights:
    """Any supported SAE as `SAEWeights` (float tensors, detached, on the CPU device they came on).

    sae: an `SAEWeights`; a SAELens `SAE` object; a folder saved by SAELens (`cfg.json`); a scope
    folder of the authors (`config.json` with a "point"); or a tuple `(W_enc, b_enc, W_dec, b_dec)` in
    SAELens shapes, which needs `hook_name`. `hook_name` overrides the hook recorded with the SAE
    (e.g. an SAE trained on another model's `blocks.3.hook_mlp_out`).
    """
    if isinstance(sae, SAEWeights):
        out = sae
    elif isinstance(sae, (tuple, list)):
        if len(sae) != 4:
            raise ValueError(f"a plain SAE is the tuple (W_enc, b_enc, W_dec, b_dec); got {len(sae)} items")
        if hook_name is None:
            raise ValueError("a plain (W_enc, b_enc, W_dec, b_dec) SAE needs hook_name= (the hook it reads, "
                             "e.g. 'blocks.1.hook_mlp_out')")
        W_enc, b_enc, W_dec, b_dec = (torch.as_tensor(t).detach() for t in sae)
        out = SAEWeights(W_enc, b_enc, W_dec, b_dec, hook_name, source="tensors")
    elif isinstance(sae, (str, Path)):
        path = Path(sae)
        if (path / "cfg.json").is_file():
            out = _from_saelens(_saelens().SAE.load_from_disk(str(path)), source=str(path))
        elif (path / "config.json").is_file() and "point" in json.loads((path / "config.json").read_text()):
            out = load_scope_sae(path)
        else:
            raise ValueError(f"{path} is neither a SAELens folder (cfg.json + sae_weights.safetensors) nor a "
                             "scope folder (config.json with a 'point' + model.safetensors)")
    elif hasattr(sae, "W_enc") and hasattr(sae, "cfg"):
        out = _from_saelens(sae)
    else:
        raise TypeError(f"cannot read an SAE from a {type(sae).__name__}: pass a SAELens SAE, a saved folder, "
                        "or (W_enc, b_enc, W_dec, b_dec) with hook_name=")
    if hook_name is not None and hook_name != out.hook_name:
        out = replace(out, hook_name=hook_name)
    if not out.hook_name:
        raise ValueError("this SAE records no hook name; pass hook_name= (e.g. 'blocks.1.hook_mlp_out')")
    return out


def _saelens() -> Any:
    try:
        import sae_lens
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading SAELens folders needs sae-lens: pip install 'hooked-bilinear[sae]' "
                          "(sae-lens requires transformer-lens < 4)") from e
    return sae_lens


def _from_saelens(sae: Any, source: str = "SAELens SAE") -> SAEWeights:
    cfg = sae.cfg
    metadata = getattr(cfg, "metadata", None)
    # sae-lens >= 6 keeps the hook in cfg.metadata; older releases on cfg itself.
    hook = getattr(metadata, "hook_name", None) if metadata is not None else None
    hook = hook or getattr(cfg, "hook_name", None) or ""
    norm = getattr(cfg, "normalize_activations", "none") or "none"
    if norm in ("layer_norm", "constant_norm_rescale"):
        raise ValueError(f"this SAE normalizes each input at run time (normalize_activations={norm!r}), so its "
                         "pre-activation is not an affine function of the activation: no exact Q mapping")
    architecture = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else str(
        getattr(cfg, "architecture", "standard"))
    if architecture in ("gated", "transcoder", "skip_transcoder", "matching_pursuit", "temporal", "abstopk"):
        raise ValueError(f"SAE architecture {architecture!r} is not supported: its pre-activation is not one "
                         "affine map of the hook it reads (standard, topk, batchtopk and jumprelu are)")
    if getattr(cfg, "reshape_activations", "none") not in ("none", None):
        raise ValueError("SAEs on reshaped activations (hook_z) do not read the residual stream")
    detach = lambda t: None if t is None else t.detach().float().cpu()
    return SAEWeights(
        W_enc=detach(sae.W_enc), b_enc=detach(sae.b_enc), W_dec=detach(sae.W_dec), b_dec=detach(sae.b_dec),
        hook_name=hook, architecture=architecture, k=getattr(cfg, "k", None),
        threshold=detach(getattr(sae, "threshold", None)),
        apply_b_dec_to_input=bool(getattr(cfg, "apply_b_dec_to_input", True)), source=source,
        rescale_acts_by_decoder_norm=bool(getattr(cfg, "rescale_acts_by_decoder_norm", False)))


def scope_hook_name(point: str, layer: int) -> str:
    """The hook an authors' scope SAE reads: ('mlp-out', 3) -> 'blocks.3.hook_mlp_out'."""
    key = point.replace("-", "_")
    if key not in SCOPE_POINTS:
        raise ValueError(f"unknown scope point {point!r}; known: {sorted(SCOPE_POINTS)}")
    return SCOPE_POINTS[key].format(l=int(layer))


def load_scope_sae(path: Union[str, Path], layer: Optional[int] = None, point: Optional[str] = None,
                   expansion: int = 4, k: int = 30) -> SAEWeights:
    """An SAE of the authors' `tdooms/<model>-scope` collections (TopK, `config.json` + `model.safetensors`).

    path: a scope folder itself, or a collection folder / Hugging Face repo id holding
    `"{layer}-{point}-x{expansion}-k{k}"` subfolders (then layer and point are needed; a repo id is
    downloaded with huggingface_hub, so it needs the network the first time).
    Their encoder is `topk(w_enc(a / normalize - b_dec))` and decoder `(w_dec(f) + b_dec) * normalize`,
    with torch Linear weights: `w_enc.weight` [d_sae, d_in], `w_dec.weight` [d_in, d_sae].
    """
    from safetensors.torch import load_file

    path_s = str(path)
    if layer is not None or point is not None:
        if layer is None or point is None:
            raise ValueError("pass both layer and point (e.g. layer=3, point='mlp-out') to pick a scope SAE")
        name = f"{layer}-{point}-x{expansion}-k{k}".replace("_", "-")
        if Path(path_s).is_dir():
            folder = Path(path_s) / name
        else:
            from huggingface_hub import hf_hub_download

            cfg_file = hf_hub_download(repo_id=path_s, filename=f"{name}/config.json")
            hf_hub_download(repo_id=path_s, filename=f"{name}/model.safetensors")
            folder = Path(cfg_file).parent
    else:
        folder = Path(path_s)
    cfg_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json + model.safetensors (a scope SAE folder)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("bilinear_encoder"):
        raise ValueError(f"{folder}: a bilinear encoder is quadratic in its input, not an affine map: unsupported")
    if cfg.get("token_lookup"):
        raise ValueError(f"{folder}: token-lookup decoders add a per-token term; unsupported")
    pt = cfg["point"]
    pt_name, pt_layer = (pt["name"], pt["layer"]) if isinstance(pt, dict) else (pt[0], pt[1])
    state = load_file(str(weights_path))
    W_enc = state["w_enc.weight"].float().T.contiguous()  # [d_in, d_sae]
    d_sae = W_enc.shape[1]
    b_enc = state["w_enc.bias"].float() if "w_enc.bias" in state else torch.zeros(d_sae)
    W_dec = state["w_dec.weight"].float().T.contiguous()  # [d_sae, d_in]
    b_dec = state["b_dec"].float()
    return SAEWeights(W_enc, b_enc, W_dec, b_dec, scope_hook_name(pt_name, pt_layer), architecture="topk",
                      k=int(cfg.get("k", k)), input_scale=float(cfg.get("normalize") or 1.0), source=str(folder),
                      reads_gained_norm_output=pt_name.replace("-", "_") == "mlp_in")


# --- mapping into the space Q lives in -------------------------------------------------------------

def x_space(model: Any, layer: int) -> str:
    return {
        "RMS": f"x = blocks.{layer}.hook_resid_mid / blocks.{layer}.ln2.hook_scale (ln2 gain folded into W_gate, W_in)",
        "LN": f"x = centred blocks.{layer}.hook_resid_mid / blocks.{layer}.ln2.hook_scale (ln2 gain, bias folded in)",
        None: f"x = blocks.{layer}.hook_resid_mid",
    }[model.cfg.normalization_type]


@dataclass
class OutputFeatures:
    """Output-SAE features of the MLP of `layer` as output directions.

    directions [n, d_model]: u_j (effective encoder columns), so the MLP part of feature j's
    pre-activation is `u_j . hook_mlp_out = x'^T Q(u_j) x'` (x' = [x, 1] when the MLP has biases).
    bias [n]: the SAE's constant, `pre_j = x'^T Q(u_j) x' + bias_j (+ u_j . resid_mid if rest_hook)`.
    indices [n]: the SAE feature ids. rest_hook: None on `hook_mlp_out`; for an SAE on the residual
    after the MLP, the hook whose dot product with u_j completes the pre-activation.
    """

    layer: int
    directions: Tensor
    bias: Tensor
    indices: Tensor
    hook_name: str
    rest_hook: Optional[str]
    space: str
    sae: SAEWeights


def _feature_ids(features: Optional[Union[Sequence[int], Tensor]], d_sae: int) -> Tensor:
    if features is None:
        return torch.arange(d_sae)
    ids = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    if ids.numel() and (ids.min() < 0 or ids.max() >= d_sae):
        raise ValueError(f"feature ids must be in [0, {d_sae}), got {ids.min().item()}..{ids.max().item()}")
    return ids


def _load_for(model: Any, sae: SAELike, hook_name: Optional[str]) -> SAEWeights:
    """`load_sae`, refusing an SAE whose width is not the model's d_model."""
    w = load_sae(sae, hook_name)
    if w.d_in != model.cfg.d_model:
        raise ValueError(f"the SAE reads d_in={w.d_in} but the model has d_model={model.cfg.d_model}")
    return w


def output_features(model: Any, sae: SAELike, features: Optional[Sequence[int]] = None,
                    hook_name: Optional[str] = None) -> OutputFeatures:
    """An SAE on the MLP's output as a batch of output directions of that MLP (see `OutputFeatures`).

    Accepted hooks: `blocks.{l}.hook_mlp_out` (exact: the pre-activation is x'^T Q x' + bias),
    `blocks.{l}.hook_resid_post` and `blocks.{l+1}.hook_resid_pre` (the MLP part is; the rest is
    `u . blocks.{l}.hook_resid_mid`). features: which SAE features (default all).
    """
    w = _load_for(model, sae, hook_name)
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_mlp_out|hook_resid_post|hook_resid_pre)", w.hook_name)
    if m is None:
        raise ValueError(f"an output SAE must read blocks.L.hook_mlp_out (or the residual right after the MLP); "
                         f"this one reads {w.hook_name!r}. For an SAE on the MLP's input use input_basis()")
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "hook_resid_pre":
        if layer == 0:
            raise ValueError("blocks.0.hook_resid_pre comes before any MLP; no MLP output to explain")
        layer -= 1
    layer = check_layer(model, layer)
    E, c = w.encoder_affine()
    ids = _feature_ids(features, w.d_sae)
    dtype = model.W_E.dtype
    rest = None if kind == "hook_mlp_out" else f"blocks.{layer}.hook_resid_mid"
    space = (f"u_j are residual directions read from blocks.{layer}.hook_mlp_out; Q(u_j) acts on "
             f"{x_space(model, layer)}; x'^T Q(u_j) x' + bias_j = the SAE's pre-activation"
             + ("" if rest is None else f" minus u_j . {rest}"))
    return OutputFeatures(layer, E.T[ids].to(dtype), c[ids].to(dtype), ids, w.hook_name, rest, space, w)


@dataclass
class InputBasis:
    """Input-SAE decoder rows in the space Q of the MLP of `layer` acts on.

    decoder [n, d_model] and offset [d_model]: the SAE's reconstruction in x-space is
    `x_hat = (f @ decoder + offset) / scale`, where `scale` is 1 for an SAE on the norm's output
    (`ln2.hook_normalized`, exact) and `blocks.{layer}.ln2.hook_scale` at each position for an SAE on
    `hook_resid_mid` (`per_position_scale=True`). indices [n]: SAE feature ids.
    """

    layer: int
    decoder: Tensor
    offset: Tensor
    indices: Tensor
    hook_name: str
    per_position_scale: bool
    space: str
    sae: SAEWeights


def input_basis(model: Any, sae: SAELike, features: Optional[Sequence[int]] = None,
                hook_name: Optional[str] = None) -> InputBasis:
    """An SAE on the MLP's input as a basis of the space Q acts on (see `InputBasis`).

    Accepted hooks: `blocks.{l}.ln2.hook_normalized` (x itself; for the authors' `mlp_in`, read after
    the gain, rows are divided by the gain and LN's bias removed), `blocks.{l}.hook_resid_mid` and
    `blocks.{l}.hook_mlp_in` (rows centred for LN; the norm's per-position scale stays a factor).
    """
    w = _load_for(model, sae, hook_name)
    m = re.fullmatch(r"blocks\.(\d+)\.(ln2\.hook_normalized|hook_resid_mid|hook_mlp_in)", w.hook_name)
    if m is None:
        raise ValueError(f"an input SAE must read the MLP's input, blocks.L.ln2.hook_normalized or "
                         f"blocks.L.hook_resid_mid; this one reads {w.hook_name!r}. For an SAE on the MLP's "
                         "output use output_features()")
    layer = check_layer(model, int(m.group(1)))
    D, b = w.decoder_affine()
    ids = _feature_ids(features, w.d_sae)
    D = D[ids]
    kind = model.cfg.normalization_type
    on_residual = m.group(2) != "ln2.hook_normalized"
    per_position = on_residual and kind is not None
    if kind is not None and not on_residual and w.reads_gained_norm_output:
        norm = model.blocks[layer].ln2
        gain, bias = getattr(norm, "w", None), getattr(norm, "b", None)
        if bias is not None:
            b = b - bias.detach().to(b.dtype)
        if gain is not None:
            gain = gain.detach().to(D.dtype)
            if (gain.abs() < 1e-8).any():
                raise ValueError(f"blocks.{layer}.ln2 has (near-)zero gains: its output does not determine x; "
                                 "train the input SAE on blocks.L.ln2.hook_normalized (before the gain) instead")
            D, b = D / gain, b / gain
    if kind == "LN" and on_residual:
        # LN subtracts the mean first: only the centred part of a row reaches the MLP.
        D, b = D - D.mean(-1, keepdim=True), b - b.mean()
    space = (f"rows are input features in {x_space(model, layer)}"
             + (f", up to the per-position factor 1 / blocks.{layer}.ln2.hook_scale" if per_position else ""))
    dtype = model.W_E.dtype
    return InputBasis(layer, D.to(dtype), b.to(dtype), ids, w.hook_name, per_position, space, w)
