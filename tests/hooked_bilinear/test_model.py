"""The hooked model: hook names and order, forward options, attention paths, errors."""

import pytest
import torch

from hooked_bilinear import HookedBilinearTransformer

from ..conftest import tiny_config

BLOCK_HOOKS = [
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
    "hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized",
    "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]


def expected_hook_names(n_layers: int, pos_embed: bool = False) -> list[str]:
    names = ["hook_embed"] + (["hook_pos_embed"] if pos_embed else [])
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{h}" for h in BLOCK_HOOKS]
    return names + ["ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]


def test_hook_names_and_execution_order(tiny_model):
    fired = []
    tokens = torch.randint(0, 48, (2, 6))
    tiny_model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, lambda x, hook: fired.append(hook.name))])
    assert fired == expected_hook_names(2)
    # hook_dict also lists TransformerLens's optional points, which fire only when switched on
    optional = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result", "hook_mlp_in")
    assert [n for n in tiny_model.hook_dict if not n.endswith(optional)] == expected_hook_names(2)
    assert len(tiny_model.hook_dict) == len(expected_hook_names(2)) + 2 * len(optional)


def test_hook_shapes(tiny_model):
    _, cache = tiny_model.run_with_cache(torch.randint(0, 48, (3, 5)))
    assert cache["blocks.0.attn.hook_q"].shape == (3, 5, 4, 8)
    assert cache["blocks.0.attn.hook_k"].shape == (3, 5, 2, 8)  # grouped-query: 2 shared heads
    assert cache["blocks.0.attn.hook_pattern"].shape == (3, 4, 5, 5)
    assert cache["blocks.1.mlp.hook_post"].shape == (3, 5, 64)
    assert cache["blocks.1.ln2.hook_scale"].shape == (3, 5, 1)


def test_mlp_hooks_are_the_bilinear_factors(tiny_model):
    _, cache = tiny_model.run_with_cache(torch.randint(0, 48, (2, 7)))
    x = cache["blocks.1.ln2.hook_normalized"]
    mlp = tiny_model.blocks[1].mlp
    torch.testing.assert_close(cache["blocks.1.mlp.hook_pre"], x @ mlp.W_gate)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_pre_linear"], x @ mlp.W_in)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_post"], (x @ mlp.W_gate) * (x @ mlp.W_in))
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"], cache["blocks.1.mlp.hook_post"] @ mlp.W_out)


@pytest.mark.parametrize("act_fn, beta", [("silu", None), ("relu", None), ("gelu", None), ("silu", 0.3)])
def test_gate_activations(act_fn, beta):
    model = HookedBilinearTransformer(tiny_config(act_fn=act_fn, gate_beta=beta))
    _, cache = model.run_with_cache(torch.randint(0, 48, (1, 5)), names_filter=lambda n: "mlp.hook" in n)
    pre, lin = cache["blocks.0.mlp.hook_pre"], cache["blocks.0.mlp.hook_pre_linear"]
    gate = {
        "silu": torch.nn.functional.silu, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
    }[act_fn] if beta is None else (lambda x: x * torch.sigmoid(beta * x))
    torch.testing.assert_close(cache["blocks.0.mlp.hook_post"], gate(pre) * lin)


def test_beta_zero_is_half_the_bilinear_model():
    bilinear = HookedBilinearTransformer(tiny_config(seed=3))
    gated = HookedBilinearTransformer(tiny_config(seed=3, act_fn="silu", gate_beta=0.0))
    tokens = torch.randint(0, 48, (2, 6))
    _, c1 = bilinear.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_post")
    _, c2 = gated.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_post")
    torch.testing.assert_close(c2["blocks.0.mlp.hook_post"], c1["blocks.0.mlp.hook_post"] / 2)


def test_return_types_and_loss(tiny_model):
    tokens = torch.randint(0, 48, (2, 8))
    logits = tiny_model(tokens)
    loss = tiny_model(tokens, return_type="loss")
    both_logits, both_loss = tiny_model(tokens, return_type="both")
    per_token = tiny_model(tokens, return_type="loss", loss_per_token=True)
    assert tiny_model(tokens, return_type=None) is None
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 48), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(both_loss, expected)
    torch.testing.assert_close(both_logits, logits)
    assert per_token.shape == (2, 7)
    torch.testing.assert_close(per_token.mean(), expected)


def test_start_and_stop_at_layer_compose(tiny_model):
    tokens = torch.randint(0, 48, (2, 8))
    resid = tiny_model(tokens, stop_at_layer=1)
    _, cache = tiny_model.run_with_cache(tokens)
    torch.testing.assert_close(resid, cache["blocks.1.hook_resid_pre"])
    logits = tiny_model(resid, start_at_layer=1)
    torch.testing.assert_close(logits, tiny_model(tokens))
    loss = tiny_model(resid, start_at_layer=1, tokens=tokens, return_type="loss")
    torch.testing.assert_close(loss, tiny_model(tokens, return_type="loss"))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_unpadded_runs(tiny_model, side):
    a, b = torch.randint(1, 48, (1, 7)), torch.randint(1, 48, (1, 4))
    pad = torch.zeros(1, 3, dtype=torch.long)
    b_padded = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    mask_b = torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], 1) if side == "left" else torch.cat([torch.ones(1, 4), torch.zeros(1, 3)], 1)
    tokens = torch.cat([a, b_padded])
    mask = torch.cat([torch.ones(1, 7), mask_b]).long()
    for explicit in (False, True):  # the fused kernel and the explicit (hooked) path
        hooks = [("blocks.0.attn.hook_pattern", lambda x, hook: x)] if explicit else []
        logits = tiny_model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
        torch.testing.assert_close(logits[0], tiny_model(a)[0], atol=1e-5, rtol=1e-5)
        real = slice(3, 7) if side == "left" else slice(0, 4)
        torch.testing.assert_close(logits[1, real], tiny_model(b)[0], atol=1e-5, rtol=1e-5)
    # The loss ignores the padded targets.
    loss_b = tiny_model(b_padded, attention_mask=mask_b.long(), return_type="loss")
    torch.testing.assert_close(loss_b, tiny_model(b, return_type="loss"), atol=1e-5, rtol=1e-5)


def test_fused_and_explicit_attention_agree(tiny_model):
    tokens = torch.randint(0, 48, (3, 12))
    fused = tiny_model(tokens)
    explicit = tiny_model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_attn_scores", lambda x, hook: x)])
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_pattern_hook_can_edit_attention(tiny_model):
    tokens = torch.randint(0, 48, (1, 6))

    def attend_to_first(pattern, hook):
        edited = torch.zeros_like(pattern)
        edited[..., 0] = 1.0
        return edited

    with tiny_model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", attend_to_first)]):
        logits, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.attn.hook_"))
    assert not torch.allclose(logits, tiny_model(tokens))
    # every query now reads the first position's values (heads share values in groups of two)
    v_first = cache["blocks.0.attn.hook_v"][:, :1].repeat_interleave(2, dim=2)  # [1, 1, n_heads, d_head]
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"], v_first.expand_as(cache["blocks.0.attn.hook_z"]))


def test_hooks_removed_even_when_forward_raises(tiny_model):
    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_model.run_with_hooks(torch.randint(0, 48, (1, 4)), fwd_hooks=[("blocks.0.hook_resid_pre", boom)])
    assert not any(hp.has_hooks() for hp in tiny_model.hook_points())
    with pytest.raises(RuntimeError):
        with tiny_model.hooks(fwd_hooks=[("hook_embed", boom)]):
            tiny_model(torch.randint(0, 48, (1, 4)))
    assert not any(hp.has_hooks() for hp in tiny_model.hook_points())
    tiny_model(torch.randint(0, 48, (1, 4)))  # and the model still runs


def test_unknown_hook_name_lists_close_names(tiny_model):
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_pre"):
        tiny_model.run_with_hooks(torch.randint(0, 48, (1, 4)), fwd_hooks=[("blocks.0.hook_resid_pr", lambda x, hook: x)])
    with pytest.raises(ValueError, match="mlp.hook_post"):
        tiny_model.run_with_cache(torch.randint(0, 48, (1, 4)), names_filter=["blocks.1.mlp.hook_pst"])


def test_bad_tokens_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_model(torch.tensor([[1, 2, 48]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds n_ctx=24"):
        tiny_model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="integer ids"):
        tiny_model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="no tokenizer"):
        tiny_model("hello")


def test_weight_views_have_transformer_lens_shapes(tiny_model):
    L, h, d, k, m, v = 2, 4, 32, 8, 64, 48
    shapes = {
        "W_E": (v, d), "W_U": (d, v), "b_U": (v,), "W_Q": (L, h, d, k), "W_K": (L, h, d, k), "W_V": (L, h, d, k),
        "W_O": (L, h, k, d), "b_Q": (L, h, k), "b_K": (L, h, k), "b_V": (L, h, k), "b_O": (L, d),
        "W_gate": (L, d, m), "W_in": (L, d, m), "W_out": (L, m, d), "b_in": (L, m), "b_out": (L, d),
    }
    for name, shape in shapes.items():
        assert tuple(getattr(tiny_model, name).shape) == shape, name
    # grouped-query views repeat the two shared K heads
    torch.testing.assert_close(tiny_model.W_K[0, 0], tiny_model.W_K[0, 1])
    assert tuple(tiny_model.QK.shape) == (L, h, d, d) and tuple(tiny_model.OV.shape) == (L, h, d, d)
    torch.testing.assert_close(tiny_model.OV[0, 2].AB, tiny_model.W_V[0, 2] @ tiny_model.W_O[0, 2])


def test_satisfies_transformer_lens_protocol(tiny_model):
    protocol = pytest.importorskip("transformer_lens.model_protocol", reason="transformer-lens 4.x only")
    assert isinstance(tiny_model, protocol.TransformerLensModelWithWeights)


def test_attn_out_scale_is_applied_and_visible_to_the_cache():
    model = HookedBilinearTransformer(tiny_config(attn_out_scale=0.25))
    tokens = torch.randint(0, 48, (2, 5))
    _, cache = model.run_with_cache(tokens)
    heads = cache.stack_head_results(layer=1)  # [head, batch, pos, d_model]
    torch.testing.assert_close(heads.sum(0), cache["blocks.0.hook_attn_out"], atol=1e-6, rtol=1e-5)


def test_tied_embeddings_share_storage():
    model = HookedBilinearTransformer(tiny_config(tie_embeddings=True))
    assert model.W_U.data_ptr() == model.W_E.data_ptr()
    assert "unembed.W_U" not in model.state_dict()
    torch.testing.assert_close(model.W_U, model.W_E.T)


def test_text_input_and_token_helpers(tiny_model_with_tokenizer):
    model = tiny_model_with_tokenizer
    tokens = model.to_tokens("once upon a time")
    assert tokens.shape == (1, 5) and tokens[0, 0] == model.tokenizer.bos_token_id
    assert model.to_str_tokens("once upon a time") == ["<|endoftext|>", "once", "upon", "a", "time"]
    assert model.to_string(tokens[0, 1:]) == "once upon a time"
    assert model.to_single_token("happy") == model.tokenizer.convert_tokens_to_ids("happy")
    with pytest.raises(ValueError, match="not one"):
        model.to_single_token("very happy")
    torch.testing.assert_close(model("once upon a time"), model(tokens))
    batch = model.to_tokens(["she was happy", "tom"], padding_side="left")
    assert batch.shape == (2, 4) and batch[1, 0] == model.tokenizer.pad_token_id
    # padded text batches get an attention mask automatically
    logits = model(["she was happy", "tom"], padding_side="left")
    torch.testing.assert_close(logits[1, -1], model("tom")[0, -1], atol=1e-5, rtol=1e-5)
