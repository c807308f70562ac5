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


def reference_logits(config: dict, w: dict, tokens: torch.Tensor, mlp_out: str = "p") -> torch.Tensor:
    """The original architecture, step by step: no code shared with the library. Norm gains,
    biases and the attention scale are used when the checkpoint has them (the 2024 code: gains,
    `mlp.o`, a bool gate, no scale)."""
    n_head, d_head = config["n_head"], config["d_model"] // config["n_head"]
    n_pos = tokens.shape[1]
    gate = {None: lambda x: x, False: lambda x: x, True: torch.relu, "relu": torch.relu,
            "silu": torch.nn.functional.silu}[config["gate"]]

    def norm(x, name):
        if not config["normalization"]:
            return x
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)
        return x * w[name + ".norm.weight"] if name + ".norm.weight" in w else x

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

    scale = 1 / math.sqrt(2 * config["n_layer"]) if config.get("scale_attn", False) else 1.0
    causal = torch.ones(n_pos, n_pos).tril().bool()
    x = w["transformer.wte.weight"][tokens]
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        qkv = linear(norm(x, p + "n1"), p + "attn.qkv")  # [batch, pos, 3 * d_model], rows (3, head, d_head)
        q, k, v = qkv.view(*qkv.shape[:2], 3, n_head, d_head).permute(2, 0, 3, 1, 4)
        q, k = rotate(q), rotate(k)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d_head)
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = (pattern @ v).transpose(1, 2).reshape(*x.shape)
        x = x + scale * linear(z, p + "attn.o")
        left, right = linear(norm(x, p + "n2"), p + "mlp.w").chunk(2, dim=-1)
        x = x + linear(gate(left) * right, p + "mlp." + mlp_out)
    return linear(norm(x, "transformer.n_f"), "lm_head")


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


# --- the research code's bias=True and the 2024 paper's 1-layer family ---------------------------


def test_research_bias_true_has_qkv_bias_but_no_output_bias(tmp_path):
    config = papers_config(bias=True, scale_attn=True, tokenizer="ss-4096")
    weights = papers_weights(bias=True)
    g = torch.Generator().manual_seed(9)
    for i in range(N_LAYER):  # nn.Linear(d, 3d, bias=True) for qkv, nn.Linear(d, d, bias=False) for o
        weights[f"transformer.h.{i}.attn.qkv.bias"] = torch.randn(3 * D_MODEL, generator=g) * 0.2
    directory = write_checkpoint(tmp_path / "ckpt", config, weights)
    with pytest.warns(UserWarning, match="tdooms/ss-tokenizer-4096"):
        model = HookedBilinearTransformer.from_pretrained(directory)
    assert model.cfg.tokenizer_name == "tdooms/ss-tokenizer-4096"
    assert torch.all(model.blocks[0].attn.b_O == 0) and model.blocks[0].attn.b_Q.abs().sum() > 0
    tokens = random_tokens(N_VOCAB, n_pos=N_CTX)
    torch.testing.assert_close(model(tokens), reference_logits(config, weights, tokens), atol=1e-4, rtol=1e-4)


def config_2024(**overrides) -> dict:
    """The 2024 code's config.json: no tokenizer, bias or scale_attn keys; gate is a bool."""
    config = dict(n_vocab=N_VOCAB, n_head=N_HEAD, n_layer=1, n_ctx=N_CTX, d_model=D_MODEL, d_hidden=D_HIDDEN,
                  bilinear=True, gate=False, normalization=True, noise=None, modifier="i5",
                  architectures=["Transformer"], model_type="")
    config.update(overrides)
    return config


def weights_2024(n_layer: int = 1, gains: bool = True, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    w = {"transformer.wte.weight": rand(N_VOCAB, D_MODEL), "lm_head.weight": rand(N_VOCAB, D_MODEL)}
    if gains:
        w["transformer.n_f.norm.weight"] = rand(D_MODEL, offset=1.0)
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        w.update({p + "attn.qkv.weight": rand(3 * D_MODEL, D_MODEL), p + "attn.o.weight": rand(D_MODEL, D_MODEL),
                  p + "mlp.w.weight": rand(2 * D_HIDDEN, D_MODEL), p + "mlp.o.weight": rand(D_MODEL, D_HIDDEN),
                  p + "attn.rotary.inv_freq": torch.ones(D_MODEL // N_HEAD // 2)})
        if gains:
            w.update({p + "n1.norm.weight": rand(D_MODEL, offset=1.0), p + "n2.norm.weight": rand(D_MODEL, offset=1.0)})
    return w


@pytest.mark.parametrize("gate", [False, True], ids=["bilinear", "relu_gate"])
def test_2024_family_matches_independent_reference(gate, tmp_path):
    config = config_2024(gate=gate)
    weights = weights_2024()
    directory = write_checkpoint(tmp_path / "TinyStories-1-32-i5", config, weights)
    assert detect_format(directory) == "papers"
    with pytest.warns(UserWarning, match="could not load tokenizer 'tdooms/TinyStories-40'"):
        model = HookedBilinearTransformer.from_pretrained(directory)
    cfg = model.cfg
    assert (cfg.n_layers, cfg.norm_weights, cfg.eps, cfg.attn_out_scale) == (1, True, 1e-8, 1.0)
    assert cfg.act_fn == ("relu" if gate else "linear")
    tokens = random_tokens(N_VOCAB, n_pos=N_CTX)
    expected = reference_logits(config, weights, tokens, mlp_out="o")
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)
    # the gains really are used: without them the logits differ
    plain = reference_logits(config, {k: v for k, v in weights.items() if ".norm." not in k}, tokens, mlp_out="o")
    assert (plain - expected).abs().max() > 1e-2
    assert torch.equal(model.blocks[0].mlp.W_out, weights["transformer.h.0.mlp.o.weight"].T)


def test_2024_family_without_normalization(tmp_path):
    config = config_2024(normalization=False, n_layer=2)
    weights = weights_2024(n_layer=2, gains=False)
    directory = write_checkpoint(tmp_path / "ckpt", config, weights)
    model = HookedBilinearTransformer.from_pretrained(directory, tokenizer=False)
    assert model.cfg.normalization_type is None
    tokens = random_tokens(N_VOCAB, n_pos=8)
    torch.testing.assert_close(model(tokens), reference_logits(config, weights, tokens, mlp_out="o"),
                               atol=1e-4, rtol=1e-4)


def test_attention2_is_refused(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", papers_config(attention2=True), papers_weights(False))
    with pytest.raises(CheckpointError, match="attention2=true"):
        HookedBilinearTransformer.from_pretrained(directory, tokenizer=False)


@pytest.mark.parametrize("named, repo, pad", [("ss-4096", "tdooms/ss-tokenizer-4096", "[EOS]"),
                                              ("ts-4096", "tdooms/ts-tokenizer-4096", "[EOS]"),
                                              ("gpt2", "openai-community/gpt2", "<|endoftext|>")])
def test_named_tokenizers_get_the_authors_pad_token_and_right_padding(named, repo, pad, tmp_path, monkeypatch):
    calls = []

    def fake_from_pretrained(name, **settings):
        calls.append((name, settings))
        raise OSError("offline (test)")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", fake_from_pretrained)
    directory = write_checkpoint(tmp_path / "ckpt", papers_config(tokenizer=named), papers_weights(False))
    with pytest.warns(UserWarning, match="could not load tokenizer"):
        HookedBilinearTransformer.from_pretrained(directory)
    assert calls == [(repo, {"pad_token": pad, "padding_side": "right"})]


def test_tokenizer_in_the_folder_gets_pad_token_and_side(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(N_VOCAB - 3)}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory = write_checkpoint(tmp_path / "ckpt", papers_config(tokenizer="ts-4096"), papers_weights(False))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[EOS]",
                            padding_side="left").save_pretrained(directory)
    model = HookedBilinearTransformer.from_pretrained(directory)
    assert model.tokenizer.pad_token == "[EOS]" and model.tokenizer.pad_token_id == 2
    assert model.tokenizer.padding_side == "right"


def test_papers_model_saves_as_hf_and_native(tmp_path):
    # Loaded parameters are views sharing the checkpoint's fused tensors; both savers must cope.
    from transformers import LlamaForCausalLM

    config = papers_config(scale_attn=True)
    weights = papers_weights(False)
    model = HookedBilinearTransformer.from_pretrained(write_checkpoint(tmp_path / "ckpt", config, weights),
                                                      tokenizer=False)
    model.save_pretrained(tmp_path / "as_hf", format="hf")
    model.save_pretrained(tmp_path / "native")
    tokens = random_tokens(N_VOCAB, n_pos=N_CTX)
    expected = reference_logits(config, weights, tokens)
    with torch.no_grad():
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "as_hf").eval()
        torch.testing.assert_close(hf(tokens).logits, expected, atol=1e-4, rtol=1e-4)
    again = HookedBilinearTransformer.from_pretrained(tmp_path / "native")
    torch.testing.assert_close(again(tokens), expected, atol=1e-4, rtol=1e-4)
