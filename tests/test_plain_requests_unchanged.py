"""With the plugin loaded, requests that use no handle are bit-identical to stock vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(model_dir: Path, mode: str) -> dict:
    env = {**os.environ, "VLLM_PLUGINS": "compaction" if mode == "plugin" else ""}
    done = subprocess.run(
        [sys.executable, "-m", "tests.plain_run", str(model_dir), mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_plain_requests_are_bit_identical_with_and_without_the_plugin(tiny_llama_dir):
    stock = _run(tiny_llama_dir, "stock")
    plugin = _run(tiny_llama_dir, "plugin")
    assert stock["backend"].endswith("CPUAttentionBackend")
    assert plugin["backend"].endswith("CompactionAttentionBackend")
    assert len(stock["outputs"]) == 3 and all(len(r["tokens"]) == 16 for r in stock["outputs"])
    assert plugin["outputs"] == stock["outputs"]  # exact float equality of every logprob
