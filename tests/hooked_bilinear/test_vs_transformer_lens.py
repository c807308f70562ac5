"""Differential test against TransformerLens 3.9's own `HookedTransformer` (runs where
transformer-lens 3.x is installed: CI's second leg; skipped on 4.x, which has no HookedTransformer).

Same random weights in both models; every hook both have must fire in the same order with the same
values, the parameter gradients must agree, and so must ActivationCache's helpers. SwiGLU is
TransformerLens's own gated MLP; bilinear is the same with its gate activation replaced by the
identity (TransformerLens has no "linear" act_fn).
"""

import pytest
import torch

HookedTransformer = pytest.importorskip(
    "transformer_lens.HookedTransformer", reason="needs transformer-lens 3.x (HookedTransformer)"
).HookedTransformer
from transformer_lens import HookedTransformerConfig  # noqa: E402

from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer  # noqa: E402

RTOL = 1e-5  # relative, against the larger of the two tensors' magnitudes

CASES = {
    "swiglu-rms-rotary": dict(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary"),
    "bilinear-rms-rotary-gqa": dict(act_fn="linear", normalization_type="RMS", positional_embedding_type="rotary",
                                    n_key_value_heads=2),
    "bilinear-ln-standard-biases": dict(act_fn="linear", normalization_type="LN", positional_embedding_type="standard",
                                        attn_bias=True, unembed_bias=True),
}


def build_pair(act_fn, normalization_type, positional_embedding_type, n_key_value_heads=None,
               attn_bias=False, unembed_bias=False):
    cfg = HookedBilinearConfig(
        d_model=32, d_head=8, n_layers=2, n_ctx=16, d_vocab=50, d_mlp=48, act_fn=act_fn,
        normalization_type=normalization_type, positional_embedding_type=positional_embedding_type,
        n_key_value_heads=n_key_value_heads, attn_bias=attn_bias, unembed_bias=unembed_bias, eps=1e-5,
        initializer_range=0.2, seed=0,
    )
    ours = HookedBilinearTransformer(cfg)
    with torch.no_grad():  # random gains and biases too, so that their placement is tested
        for name, p in ours.named_parameters():
            if name.endswith((".w", ".b")) or ".b_" in name or name.startswith("unembed.b"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith(".w") else 0.0))
    tl_cfg = HookedTransformerConfig(
        d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=16, d_vocab=50, d_mlp=48,
        act_fn="silu", gated_mlp=True, normalization_type=normalization_type, final_rms=normalization_type == "RMS",
        positional_embedding_type=positional_embedding_type, rotary_dim=8 if positional_embedding_type == "rotary" else None,
        n_key_value_heads=n_key_value_heads, eps=1e-5, dtype=torch.float32, device="cpu", default_prepend_bos=False,
    )
    theirs = HookedTransformer(tl_cfg)
    if act_fn == "linear":
        for block in theirs.blocks:
            block.mlp.act_fn = lambda x: x
    state = {}
    for name, t in ours.state_dict().items():
        state[name.replace("attn._W_K", "attn._W_K" if n_key_value_heads else "attn.W_K")
              .replace("attn._W_V", "attn._W_V" if n_key_value_heads else "attn.W_V")
              .replace("attn._b_K", "attn._b_K" if n_key_value_heads else "attn.b_K")
              .replace("attn._b_V", "attn._b_V" if n_key_value_heads else "attn.b_V")] = t
    theirs_state = theirs.state_dict()
    for name in list(theirs_state):
        if name in state:
            assert theirs_state[name].shape == state[name].shape, name
            theirs_state[name] = state[name].clone()
        elif name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U")):
            theirs_state[name] = torch.zeros_like(theirs_state[name])  # ours has none: zero
    theirs.load_state_dict(theirs_state, strict=False)
    missing = [n for n in state if n not in theirs_state]
    assert not missing, f"weights TransformerLens does not have: {missing}"
    return ours, theirs


def assert_rel_close(a, b, what):
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite) and torch.equal(a[~finite], b[~finite]), f"{what}: masking differs"
    a, b = a[finite], b[finite]
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item() / scale
    assert err <= RTOL, f"{what}: max |diff| / max |value| = {err:.2e} > {RTOL}"
    return err


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hooks_gradients_and_cache_helpers_match_transformer_lens(case):
    ours, theirs = build_pair(**CASES[case])
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))

    order_ours, order_theirs = [], []
    ours.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hook: order_ours.append(hook.name))])
    theirs.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hook: order_theirs.append(hook.name))])
    shared = set(order_ours) & set(order_theirs)
    first = lambda order: list(dict.fromkeys(n for n in order if n in shared))  # noqa: E731
    assert first(order_ours) == first(order_theirs)
    only_theirs = set(order_theirs) - shared
    assert not only_theirs, f"hooks only TransformerLens fires: {sorted(only_theirs)}"

    logits_ours, cache_ours = ours.run_with_cache(tokens)
    logits_theirs, cache_theirs = theirs.run_with_cache(tokens)
    assert_rel_close(logits_ours, logits_theirs, "logits")
    for name in shared:
        assert_rel_close(cache_ours[name], cache_theirs[name], name)

    # gradients of the loss with respect to every shared parameter
    ours.zero_grad(), theirs.zero_grad()
    ours(tokens, return_type="loss").backward()
    theirs(tokens, return_type="loss").backward()
    grads_theirs = {n.replace("_W_K", "W_K").replace("_W_V", "W_V"): p.grad for n, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        key = name.replace("_W_K", "W_K").replace("_W_V", "W_V").replace("_b_K", "b_K").replace("_b_V", "b_V")
        key = key if key in grads_theirs else name
        if key.endswith("b_K"):
            # softmax ignores a per-query constant, and q . b_K is one: this gradient is zero up to
            # rounding in both models, so only its smallness is comparable
            assert p.grad.abs().max() < 1e-5 and grads_theirs[key].abs().max() < 1e-5
            continue
        assert_rel_close(p.grad, grads_theirs[key], f"grad {name}")

    # ActivationCache helpers on both caches
    helpers = {
        "accumulated_resid": lambda c: c.accumulated_resid(apply_ln=True),
        "decompose_resid": lambda c: c.decompose_resid(apply_ln=True),
        "stack_head_results": lambda c: c.stack_head_results(apply_ln=True),
        "stack_neuron_results": lambda c: c.stack_neuron_results(layer=2, apply_ln=True),
        "full_decomposition": lambda c: c.get_full_resid_decomposition(expand_neurons=True, apply_ln=True),
    }
    for name, helper in helpers.items():
        assert_rel_close(helper(cache_ours), helper(cache_theirs), name)

    # logit_attrs differs on purpose: ours reads through the final norm's gain (so the attributions
    # sum to the logits), TransformerLens's through W_U alone. Check ours against that formula,
    # built from TransformerLens's own apply_ln_to_stack.
    stack = cache_theirs.decompose_resid()[:, :, -1]
    target = tokens[:, -1]
    direction = theirs.W_U[:, target] * theirs.ln_final.w[:, None]  # [d_model, batch]
    expected = (cache_theirs.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) * direction.T).sum(-1)
    attrs = cache_ours.logit_attrs(cache_ours.decompose_resid()[:, :, -1], tokens=target, pos_slice=-1)
    assert_rel_close(attrs, expected, "logit_attrs (final norm gain included)")


@pytest.mark.parametrize("setter", ["set_use_attn_result", "set_use_split_qkv_input", "set_use_attn_in",
                                    "set_use_hook_mlp_in"])
def test_optional_hooks_match_transformer_lens(setter):
    ours, theirs = build_pair(**CASES["bilinear-ln-standard-biases"])
    getattr(ours, setter)(True)
    getattr(theirs, setter)(True)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    logits_ours, cache_ours = ours.run_with_cache(tokens)
    logits_theirs, cache_theirs = theirs.run_with_cache(tokens)
    assert_rel_close(logits_ours, logits_theirs, "logits")
    shared = set(cache_ours.keys()) & set(cache_theirs.keys())
    optional = [n for n in shared if n.endswith(("hook_result", "_input", "hook_attn_in", "hook_mlp_in"))]
    assert optional, f"{setter} made no optional hook fire"
    for name in shared:
        assert_rel_close(cache_ours[name], cache_theirs[name], name)
    assert set(cache_theirs.keys()) <= set(cache_ours.keys())
