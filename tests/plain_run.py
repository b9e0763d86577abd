"""Greedy tokens and top logprobs of a few prompts, printed as JSON (run in a subprocess).

usage: python -m tests.plain_run MODEL_DIR {stock|plugin}
"""

from __future__ import annotations

import json
import sys

from tests.engine import in_process_llm

PROMPTS = [
    "The history of the Normans begins",
    "In mathematics, a group is",
    "Question: what is the capital of France?\nAnswer:",
]


def main() -> None:
    from vllm import SamplingParams
    from vllm.config import KVTransferConfig

    model, mode = sys.argv[1], sys.argv[2]
    extra = {}
    if mode == "plugin":
        from vllm_compaction.engine import CONNECTOR_CONFIG, WORKER_EXTENSION

        extra = dict(
            worker_extension_cls=WORKER_EXTENSION,
            kv_transfer_config=KVTransferConfig(**CONNECTOR_CONFIG),
        )
    llm = in_process_llm(model, block_size=32, **extra)
    if mode == "plugin":
        llm.collective_rpc("compaction_bind")
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, logprobs=3))
    result = [
        {
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [
                {str(k): v.logprob for k, v in lp.items()} for lp in o.outputs[0].logprobs
            ],
        }
        for o in outputs
    ]
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = AttentionBackendEnum.CPU_ATTN.get_path()
    print("RESULT " + json.dumps({"backend": backend, "outputs": result}))


if __name__ == "__main__":
    main()
