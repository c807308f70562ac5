"""Generation: KV cache, TransformerLens's generate/generate_stream arguments and defaults, and the
same greedy tokens as transformers' generate on the same weights."""

import inspect

import pytest
import torch

from hooked_bilinear import HookedBilinearTransformer, KVCache

from ..conftest import tiny_config

QUIET = dict(verbose=False)


def test_kv_cache_logits_equal_full_forward(tiny_model):
    tokens = torch.randint(0, 48, (2, 10))
    cache = KVCache.empty(2)
    first = tiny_model(tokens[:, :6], past_kv_cache=cache)
    rest = [tiny_model(tokens[:, i:i + 1], past_kv_cache=cache) for i in range(6, 10)]
    full = tiny_model(tokens)
    torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_grows_past_its_capacity_and_supports_autograd(tiny_model):
    tokens = torch.randint(0, 48, (2, 24))
    full = tiny_model(tokens)
    with torch.no_grad():  # in-place buffer (capacity 16, then 32)
        cache = KVCache.empty(2)
        steps = [tiny_model(tokens[:, :3], past_kv_cache=cache)]
        steps += [tiny_model(tokens[:, i:i + 1], past_kv_cache=cache) for i in range(3, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].k_buffer.shape[1] == 32
    cache = KVCache.empty(2)  # with autograd: concatenation, and a backward pass works
    out = [tiny_model(tokens[:, :4], past_kv_cache=cache), tiny_model(tokens[:, 4:5], past_kv_cache=cache)]
    torch.cat(out, dim=1).sum().backward()
    assert tiny_model.W_E.grad is not None
    tiny_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("overrides", [dict(n_key_value_heads=2), dict(attn_bias=True, n_key_value_heads=1)])
def test_few_row_attention_path_equals_the_fused_one(overrides):
    # <= d_head rows take per-head products (generation steps), more rows one fused GEMM.
    model = HookedBilinearTransformer(tiny_config(seed=3, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero biases too
    tokens = torch.randint(0, 48, (3, 9))
    assert 1 * 5 <= model.cfg.d_head < 3 * 9
    torch.testing.assert_close(model(tokens[:1, :5]), model(tokens)[:1, :5], atol=1e-5, rtol=1e-5)


def test_defaults_are_transformer_lens_defaults(tiny_model):
    expected = dict(input="", max_new_tokens=10, stop_at_eos=True, eos_token_id=None, do_sample=True, top_k=None,
                    top_p=None, temperature=1.0, freq_penalty=0.0, use_past_kv_cache=True, prepend_bos=None,
                    padding_side=None, return_type="input", verbose=True)
    from hooked_bilinear.generate import generate, generate_stream

    for fn, extra in ((generate, {}), (generate_stream, {"max_tokens_per_yield": 25})):
        params = inspect.signature(fn).parameters
        assert {name: params[name].default for name in {**expected, **extra}} == {**expected, **extra}
    method = inspect.signature(tiny_model.generate).parameters
    assert method["input"].default == "" and method["max_new_tokens"].default == 10


def test_greedy_generation_with_and_without_cache_agree(tiny_model):
    prompt = torch.randint(0, 48, (2, 5))
    with_cache = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False, **QUIET)
    without = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False, use_past_kv_cache=False, **QUIET)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without)
    for t in range(5, 13):  # greedy: each new token is the argmax of the full forward on the prefix
        assert torch.equal(tiny_model(with_cache[:, :t])[:, -1].argmax(-1), with_cache[:, t])
    assert torch.equal(tiny_model.generate(prompt, max_new_tokens=8, temperature=0.0, **QUIET), with_cache)


def test_greedy_tokens_equal_transformers_generate():
    model = HookedBilinearTransformer(tiny_config(seed=11, n_key_value_heads=2, initializer_range=0.5)).eval()
    hf = model.to_hf()
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    prompt = torch.randint(0, 48, (3, 4), generator=torch.Generator().manual_seed(1))
    ours = model.generate(prompt, max_new_tokens=12, do_sample=False, stop_at_eos=False, **QUIET)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                         do_sample=False)
    assert torch.equal(ours, theirs)
    assert len(set(ours[:, 4:].flatten().tolist())) > 3  # not a degenerate constant sequence


def test_sampling_is_seeded_and_filters_work(tiny_model):
    prompt = torch.randint(0, 48, (3, 4))
    greedy = tiny_model.generate(prompt, max_new_tokens=6, do_sample=False, **QUIET)
    a = tiny_model.generate(prompt, max_new_tokens=6, temperature=1.5, seed=1, **QUIET)
    b = tiny_model.generate(prompt, max_new_tokens=6, temperature=1.5, seed=1, **QUIET)
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    assert torch.equal(tiny_model.generate(prompt, max_new_tokens=6, top_k=1, seed=2, **QUIET), greedy)
    assert torch.equal(tiny_model.generate(prompt, max_new_tokens=6, top_p=1e-6, seed=3, **QUIET), greedy)
    with pytest.raises(ValueError, match="top_p"):
        tiny_model.generate(prompt, max_new_tokens=2, top_p=1.5, **QUIET)


def test_freq_penalty_forbids_repeats(tiny_model):
    prompt = torch.randint(0, 48, (2, 4))
    out = tiny_model.generate(prompt, max_new_tokens=12, freq_penalty=1e6, seed=0, **QUIET)
    for row in out:
        assert len(set(row.tolist())) == len(row.tolist()) or len(set(row[:4].tolist())) < 4
        assert not set(row[4:].tolist()) & set(row[:4].tolist())
        assert len(set(row[4:].tolist())) == 12


def test_generation_stops_at_eos_and_pads_finished_rows(tiny_model):
    prompt = torch.randint(0, 48, (2, 4), generator=torch.Generator().manual_seed(5))
    free = tiny_model.generate(prompt, max_new_tokens=6, do_sample=False, **QUIET)
    eos = int(free[0, 5])  # row 0's second new token ends it
    stopped = tiny_model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos, **QUIET)
    assert int(stopped[0, 5]) == eos and torch.all(stopped[0, 5:] == eos)
    if eos not in free[1, 4:].tolist():  # row 1 never ends: it runs to max_new_tokens
        assert stopped.shape[1] == 10 and torch.equal(stopped[1], free[1])
    as_list = tiny_model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=[47, eos], **QUIET)
    assert int(as_list[0, 5]) == eos


def test_text_generation_left_pads_batches(tiny_model_with_tokenizer):
    model = tiny_model_with_tokenizer
    out = model.generate(["once upon a time", "tom"], max_new_tokens=4, **QUIET)
    assert isinstance(out, list) and len(out) == 2 and out[0].startswith("once upon a time")
    one = model.generate(["tom"], max_new_tokens=4, **QUIET)
    assert isinstance(one, str)  # as in TransformerLens: a batch of one decodes to one string
    batch = model.generate(["once upon a time", "tom"], max_new_tokens=4, stop_at_eos=False, do_sample=False,
                           return_type="tokens", **QUIET)
    alone = model.generate("tom", max_new_tokens=4, stop_at_eos=False, do_sample=False, return_type="tokens", **QUIET)
    assert torch.equal(batch[1, -4:], alone[0, -4:])
    assert isinstance(model.generate(batch[:1, :3], max_new_tokens=2, return_type="str", **QUIET), str)


def test_generate_stream_yields_as_it_goes_and_matches_generate(tiny_model):
    prompt = torch.randint(0, 48, (2, 3))
    full = tiny_model.generate(prompt, max_new_tokens=9, do_sample=False, stop_at_eos=False, **QUIET)
    stream = tiny_model.generate_stream(prompt, max_new_tokens=9, max_tokens_per_yield=4, do_sample=False,
                                        stop_at_eos=False, **QUIET)
    first = next(stream)  # available before generation has finished
    assert torch.equal(first, full[:, :4])  # the prompt (3) plus the first new token
    chunks = [first, *stream]
    assert [c.shape[1] for c in chunks] == [4, 4, 4]
    assert torch.equal(torch.cat(chunks, dim=1), full)


def test_generate_stream_text(tiny_model_with_tokenizer):
    chunks = list(tiny_model_with_tokenizer.generate_stream("once upon", max_new_tokens=5, max_tokens_per_yield=1,
                                                            stop_at_eos=False, **QUIET))
    assert len(chunks) == 5 and all(isinstance(c, str) for c in chunks) and chunks[0].startswith("once upon")


def test_generation_past_context_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="n_ctx"):
        tiny_model.generate(torch.randint(0, 48, (1, 20)), max_new_tokens=10, **QUIET)
