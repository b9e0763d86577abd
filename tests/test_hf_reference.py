"""The transformers reference path: capture and biased scoring on SmolLM2 reading SQuAD text."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from transformers import DynamicCache

from vllm_compaction import documents, hf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return hf.load_model(smollm2_dir)


@pytest.fixture(scope="module")
def read(smollm2):
    """A real SQuAD paragraph read by SmolLM2: context, one answer turn, full-cache capture."""
    model, tokenizer = smollm2
    article = documents.squad_article(0, hf.chat_token_count(tokenizer), max_tokens=400)
    context = hf.encode_context(tokenizer, article.messages(), article.text)
    question = article.questions[0]
    turn = hf.answer_turn(tokenizer, article.messages(), question.text, question.answer)
    layers = hf.capture(model, context.ids, len(context), {"context": (0, len(context))})
    return context, turn, layers


def model_logits(model, ids: Tensor) -> Tensor:
    """The model's own forward (its stock sdpa attention), logits [N, vocab]."""
    with hf.attention_implementation(model, "sdpa"), torch.inference_mode():
        return model(input_ids=ids[None], use_cache=False).logits[0]


def test_context_and_turn_tokenize_as_the_whole_chat(smollm2, read):
    _, tokenizer = smollm2
    context, turn, _ = read
    article = documents.squad_article(0, hf.chat_token_count(tokenizer), max_tokens=400)
    question = article.questions[0]
    whole = hf.render(
        tokenizer, [*article.messages(), {"role": "user", "content": question.text}], True
    )
    ids = tokenizer(whole + question.answer, add_special_tokens=False).input_ids
    assert ids == context.ids.tolist() + turn.ids.tolist()
    assert tokenizer.decode(turn.ids[turn.target]) == question.answer
    protected = tokenizer.decode(context.ids[context.protected])
    assert article.text[:40] not in protected and "Read this article:" in protected
    assert tokenizer.decode(context.ids[~context.protected]).strip() == article.text.strip()


def test_capture_matches_the_models_own_cache(smollm2, read):
    model, _ = smollm2
    context, _, layers = read
    cache = DynamicCache(config=model.config)
    with hf.attention_implementation(model, "sdpa"), torch.inference_mode():
        model(input_ids=context.ids[None], past_key_values=cache, use_cache=True)
    assert len(layers) == model.config.num_hidden_layers
    for i in (0, len(layers) - 1):
        torch.testing.assert_close(layers[i].keys, cache.layers[i].keys[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(layers[i].values, cache.layers[i].values[0], rtol=0, atol=1e-5)
    queries = layers[0].queries["context"]
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    assert queries.vectors.shape == (3, groups * len(context), 64)
    assert queries.positions[0].tolist() == [p for p in range(len(context)) for _ in range(groups)]


def test_pool_queries_stacks_each_groups_heads():
    query, key = torch.randn(6, 10, 4), torch.randn(2, 10, 4)
    pooled = hf.pool_queries(query, key, 2, 5, 3, 0.5)
    expected = torch.stack([query[3, 2:5], query[4, 2:5], query[5, 2:5]], dim=1).reshape(9, 4)
    torch.testing.assert_close(pooled.vectors[1], expected)
    assert pooled.positions[1].tolist() == [2, 2, 2, 3, 3, 3, 4, 4, 4]
    # Mass after the context (keys 3..): token 2 sees none, token 4 sees keys 3 and 4.
    head_5_token_4 = torch.logsumexp(0.5 * query[5, 4] @ key[1, 3:5].T, dim=0)
    torch.testing.assert_close(pooled.outside[1, 8], head_5_token_4)
    assert pooled.outside[1, :3].eq(-torch.inf).all()


def test_full_prefix_reproduces_the_models_forward(smollm2, read):
    model, _ = smollm2
    context, turn, layers = read
    t = len(context)
    reference = model_logits(model, torch.cat([context.ids, turn.ids]))[t:]
    logits = hf.continuation_logits(model, [c.full_prefix() for c in layers], t, turn.ids)
    torch.testing.assert_close(logits, reference, rtol=0, atol=2e-4)  # logits reach ~30
    torch.testing.assert_close(
        hf.next_token_logprobs(logits, turn.ids),
        hf.next_token_logprobs(reference, turn.ids),
        rtol=0,
        atol=2e-5,
    )


def test_no_prefix_is_the_models_plain_forward(smollm2, read):
    model, _ = smollm2
    _, turn, _ = read
    torch.testing.assert_close(
        hf.continuation_logits(model, None, 0, turn.ids),
        model_logits(model, turn.ids),
        rtol=0,
        atol=2e-4,
    )


def test_identity_compaction_reproduces_the_models_forward(smollm2, read):
    from vllm_compaction.core import compact_layer

    model, _ = smollm2
    context, turn, layers = read
    t = len(context)
    prefix = [compact_layer(c.keys, c.values, c.queries["context"].vectors, t) for c in layers]
    reference = model_logits(model, torch.cat([context.ids, turn.ids]))[t:]
    torch.testing.assert_close(
        hf.score_with_compacted(model, prefix, t, turn.ids),
        hf.next_token_logprobs(reference, turn.ids),
        rtol=0,
        atol=2e-5,
    )


def test_beta_log2_equals_a_duplicated_key(smollm2, read):
    model, _ = smollm2
    context, turn, layers = read
    layer, head, key = 3, 1, 17
    full = [c.full_prefix() for c in layers]
    c = full[layer]
    # Duplicate: every head gets one more row; the other heads hide theirs with -inf.
    extra_bias = torch.full((c.bias.shape[0], 1), -math.inf)
    extra_bias[head] = 0.0
    duplicated = list(full)
    duplicated[layer] = hf.Prefix(
        keys=torch.cat([c.keys, c.keys[:, key : key + 1]], dim=1),
        bias=torch.cat([c.bias, extra_bias], dim=1),
        values=torch.cat([c.values, c.values[:, key : key + 1]], dim=1),
    )
    biased = list(full)
    bias = c.bias.clone()
    bias[head, key] = math.log(2.0)
    biased[layer] = hf.Prefix(c.keys, bias, c.values)

    t = len(context)
    plain = hf.continuation_logits(model, full, t, turn.ids)
    with_copy = hf.continuation_logits(model, duplicated, t, turn.ids)
    with_beta = hf.continuation_logits(model, biased, t, turn.ids)
    torch.testing.assert_close(with_beta, with_copy, rtol=0, atol=2e-4)
    assert (with_beta - plain).abs().max() > 1e-3


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer_idx = 0


def test_biased_attention_matches_plain_torch():
    torch.manual_seed(0)
    kv_heads, groups, t, length, d = 2, 3, 7, 5, 8
    query = torch.randn(1, kv_heads * groups, length, d)
    key, value = torch.randn(2, 1, kv_heads, length, d)
    prefix = hf.Prefix(
        torch.randn(kv_heads, t, d), torch.randn(kv_heads, t), torch.randn(kv_heads, t, d)
    )
    prefix.bias[0, 2] = -math.inf  # a padding row

    out, _ = hf.compaction_attention(
        _Layer(), query, key, value, None, 0.3, compaction_prefix=[prefix]
    )

    for h in range(kv_heads * groups):
        g = h // groups
        keys = torch.cat([prefix.keys[g], key[0, g]])
        values = torch.cat([prefix.values[g], value[0, g]])
        causal = torch.full((length, length), -math.inf).triu(1)
        mask = torch.cat([prefix.bias[g].expand(length, -1), causal], dim=1)
        weights = torch.softmax(0.3 * query[0, h] @ keys.T + mask, dim=-1)
        torch.testing.assert_close(out[0, :, h], weights @ values, rtol=0, atol=1e-5)


def test_on_policy_with_identity_compaction_sees_the_captured_queries(smollm2, read):
    model, _ = smollm2
    context, turn, layers = read
    t, end = len(context), len(context) + len(turn.ids)
    captured = hf.capture(model, torch.cat([context.ids, turn.ids]), t, {"turn": (t, end)})
    seen: dict[int, hf.Queries] = {}

    def identity(index: int, queries: hf.Queries) -> hf.Prefix:
        seen[index] = queries
        return layers[index].full_prefix()

    prefix = hf.compact_on_policy(model, t, turn.ids, identity)
    assert len(prefix) == len(layers) == len(seen)
    for i in (0, len(layers) - 1):
        expected = captured[i].queries["turn"]
        torch.testing.assert_close(seen[i].vectors, expected.vectors, rtol=0, atol=1e-4)
        assert torch.equal(seen[i].positions, expected.positions)
