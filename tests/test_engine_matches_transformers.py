"""vLLM on the CPU (with our plugin loaded) generates exactly what transformers does."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.engine import in_process_llm, transformers_greedy
from vllm_compaction import documents

MAX_TOKENS = 32


def _prompt_ids(model_dir) -> list[int]:
    article = documents.squad()["data"][0]["paragraphs"][0]
    question = article["qas"][0]["question"]
    messages = [{"role": "user", "content": f"{article['context']}\n\nQuestion: {question}"}]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def _greedy_both(model_dir) -> tuple[list[int], list[int]]:
    from vllm import SamplingParams, TokensPrompt

    prompt = _prompt_ids(model_dir)
    llm = in_process_llm(model_dir)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    output = llm.generate(TokensPrompt(prompt_token_ids=prompt), params)[0].outputs[0]
    engine = list(output.token_ids)
    del llm
    gc.collect()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return engine, transformers_greedy(hf, prompt, MAX_TOKENS)


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_transformers(smollm2_dir):
    engine, reference = _greedy_both(smollm2_dir)
    assert len(engine) == MAX_TOKENS
    assert engine == reference


def test_tiny_llama_greedy_tokens_equal_transformers(tiny_llama_dir):
    engine, reference = _greedy_both(tiny_llama_dir)
    assert len(engine) == MAX_TOKENS
    assert engine == reference
