"""The published bilinear checkpoints' format (tdooms/ts-*), checked against an independent forward
pass written here in plain torch from the format's description (DESIGN.md section 6)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from hooked_bilinear import HookedBilinearTransformer
from hooked_bilinear.loading import CheckpointError, detect_format

from .conftest_loading import random_tokens

N_LAYER, D_MODEL, D_HIDDEN, N_HEAD, N_CTX, N_VOCAB = 2, 32, 48, 4, 16, 40


def papers_config(**overrides) -> dict:
    config = dict(n_layer=N_LAYER, d_model=D_MODEL, d_hidden=D_HIDDEN, n_head=N_HEAD, n_ctx=N_CTX, n_vocab=N_VOCAB,
                  bilinear=True, gate=None, bias=False, normalization=True, scale_attn=True,
                  tokenizer="tdooms/ts-tokenizer-4096", architectures=["Transformer"])
    config.update(overrides)
    return config


def papers_weights(bias: bool, attn_bias: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    w = {"transformer.wte.weight": rand(N_VOCAB, D_MODEL), "lm_head.weight": rand(N_VOCAB, D_MODEL)}
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        w.update({p + "attn.qkv.weight": rand(3 * D_MODEL, D_MODEL), p + "attn.o.weight": rand(D_MODEL, D_MODEL),
                  p + "mlp.w.weight": rand(2 * D_HIDDEN, D_MODEL), p + "mlp.p.weight": rand(D_MODEL, D_HIDDEN),
                  p + "attn.rotary.inv_freq": torch.ones(D_MODEL // N_HEAD // 2)})  # a stored buffer, ignored
        if bias:
            w.update({p + "mlp.w.bias": rand(2 * D_HIDDEN), p + "mlp.p.bias": rand(D_MODEL)})
        if attn_bias:
            w.update({p + "attn.qkv.bias": rand(3 * D_MODEL), p + "attn.o.bias": rand(D_MODEL)})
    return w


def write_checkpoint(directory, config: dict, weights: dict, as_bin: bool = False):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if as_bin:
        torch.save(weights, directory / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    return directory


def reference_logits(config: dict, w: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The original architecture, step by step: no code shared with the library."""
    n_head, d_head = config["n_head"], config["d_model"] // config["n_head"]
    n_pos = tokens.shape[1]
    gate = {None: lambda x: x, "relu": torch.relu, "silu": torch.nn.functional.silu}[config["gate"]]

    def norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8) if config["normalization"] else x

    def linear(x, name):
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_head, 2).float() / d_head))
    angles = torch.outer(torch.arange(n_pos).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [pos, d_head]
    cos, sin = angles.cos(), angles.sin()

    def rotate(x):  # x: [batch, head, pos, d_head], half-rotation layout
        x1, x2 = x[..., : d_head // 2], x[..., d_head // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    scale = 1 / math.sqrt(2 * config["n_layer"]) if config["scale_attn"] else 1.0
    causal = torch.ones(n_pos, n_pos).tril().bool()
    x = w["transformer.wte.weight"][tokens]
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        qkv = linear(norm(x), p + "attn.qkv")  # [batch, pos, 3 * d_model], rows (3, head, d_head)
        q, k, v = qkv.view(*qkv.shape[:2], 3, n_head, d_head).permute(2, 0, 3, 1, 4)
        q, k = rotate(q), rotate(k)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d_head)
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = (pattern @ v).transpose(1, 2).reshape(*x.shape)
        x = x + scale * linear(z, p + "attn.o")
        left, right = linear(norm(x), p + "mlp.w").chunk(2, dim=-1)
        x = x + linear(gate(left) * right, p + "mlp.p")
    return linear(norm(x), "lm_head")


CASES = {
    "scaled": dict(config=dict(scale_attn=True), bias=False),
    "unscaled": dict(config=dict(scale_attn=False), bias=False),
    "bias_scaled": dict(config=dict(scale_attn=True, bias=True), bias=True),
    "bias_unscaled_attn_bias": dict(config=dict(scale_attn=False, bias=True), bias=True, attn_bias=True),
    "relu_gate_bin": dict(config=dict(gate="relu"), bias=False, as_bin=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_logits_match_independent_reference(case, tmp_path):
    config = papers_config(**case["config"])
    weights = papers_weights(case["bias"], case.get("attn_bias", False))
    directory = write_checkpoint(tmp_path / "ckpt", config, weights, case.get("as_bin", False))
    assert detect_format(directory) == "papers"
    with pytest.warns(UserWarning, match="could not load tokenizer 'tdooms/ts-tokenizer-4096'"):
        model = HookedBilinearTransformer.from_pretrained(str(directory))  # offline: no tokenizer
    assert model.tokenizer is None
    cfg = model.cfg
    assert (cfg.norm_weights, cfg.eps, cfg.rotary_base, cfg.tie_embeddings) == (False, 1e-8, 10000.0, False)
    assert cfg.attn_out_scale == pytest.approx(0.5 if config["scale_attn"] else 1.0)
    assert cfg.act_fn == ("relu" if config["gate"] == "relu" else "linear")
    tokens = random_tokens(N_VOCAB, n_pos=N_CTX)
    expected = reference_logits(config, weights, tokens)
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)
    # Left half of `w` is the gate (hook_pre), right half the linear factor (a bilinear product
    # alone cannot tell them apart, so check the weights directly).
    w = weights["transformer.h.0.mlp.w.weight"]
    assert torch.equal(model.blocks[0].mlp.W_gate, w[:D_HIDDEN].T)
    assert torch.equal(model.blocks[0].mlp.W_in, w[D_HIDDEN:].T)


def test_tokenizer_can_be_passed(tmp_path, word_tokenizer):
    directory = write_checkpoint(tmp_path / "ckpt", papers_config(n_vocab=len(word_tokenizer)),
                                 {**papers_weights(False), "transformer.wte.weight": torch.randn(len(word_tokenizer), D_MODEL),
                                  "lm_head.weight": torch.randn(len(word_tokenizer), D_MODEL)})
    model = HookedBilinearTransformer.from_pretrained(directory, tokenizer=word_tokenizer)
    assert model.tokenizer is word_tokenizer


def test_wrong_shapes_are_named_in_the_original_names(tmp_path):
    weights = papers_weights(False)
    weights["transformer.h.1.mlp.p.weight"] = torch.zeros(D_MODEL, D_HIDDEN + 1)
    del weights["lm_head.weight"]
    directory = write_checkpoint(tmp_path / "ckpt", papers_config(), weights)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.p\.weight: expected \[32, 48\], found \[32, 49\](.|\n)*missing tensors: lm_head\.weight"):
        HookedBilinearTransformer.from_pretrained(directory, tokenizer=False)


def test_ungated_mlp_is_refused(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", papers_config(bilinear=False), papers_weights(False))
    with pytest.raises(CheckpointError, match="plain, ungated MLP"):
        HookedBilinearTransformer.from_pretrained(directory, tokenizer=False)


def test_truncated_bin_file(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", papers_config(), papers_weights(False), as_bin=True)
    data = (directory / "pytorch_model.bin").read_bytes()
    (directory / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*truncated or corrupt"):
        HookedBilinearTransformer.from_pretrained(directory, tokenizer=False)
