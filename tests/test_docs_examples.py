"""The docs that can be checked are checked: docs/quickstart.md's examples run against a served
model and print what the page shows, and docs/api.md is what the server's schema renders to.

Quickstart convention (also stated at the top of the page): its python blocks run in order as
one script; the first block's `BASE_URL = "..."` and `MODEL = "..."` lines are pointed at the
test server; a text block right after a python block is that block's expected output, where
"..." matches anything.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.server import TINY, served_tiny
from vllm_compaction.server import openapi_doc

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
MARK = "=== docs example {} ==="
EXAMPLES_TIMEOUT_S = 600


def examples(markdown: str) -> list[tuple[str, str | None]]:
    """Each python block with its expected output (the text block right after it, or None)."""
    blocks = [(m.group(1), m.group(2), m.start(), m.end()) for m in FENCE.finditer(markdown)]
    found = []
    for i, (lang, body, _, end) in enumerate(blocks):
        if lang != "python":
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        adjacent = following and following[0] == "text" and not markdown[end : following[2]].strip()
        found.append((body, following[1] if adjacent else None))
    return found


def script(blocks: list[str], base_url: str, model: str) -> str:
    """The blocks as one program, each announcing itself on stdout, pointed at base_url/model."""
    first, count = re.subn(r'^BASE_URL = ".*"$', f"BASE_URL = {base_url!r}", blocks[0], flags=re.M)
    first, models = re.subn(r'^MODEL = ".*"$', f"MODEL = {model!r}", first, flags=re.M)
    assert count == models == 1, "the first python block must set BASE_URL and MODEL, once each"
    parts = [first, *blocks[1:]]
    return "\n".join(
        f"print({MARK.format(i)!r}, flush=True)\n{part}" for i, part in enumerate(parts)
    )


def check(markdown: str, base_url: str, model: str, workdir: Path) -> None:
    """Run the page's examples; AssertionError if one fails or prints other than it shows."""
    found = examples(markdown)
    assert found, "no python blocks"
    program = workdir / "examples.py"
    program.write_text(script([body for body, _ in found], base_url, model))
    done = subprocess.run(
        [sys.executable, str(program)], capture_output=True, text=True, timeout=EXAMPLES_TIMEOUT_S
    )
    assert done.returncode == 0, f"an example failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    outputs = re.split(
        "^" + re.escape(MARK).replace(r"\{\}", r"\d+") + "\n", done.stdout, flags=re.M
    )
    for index, ((body, expected), printed) in enumerate(zip(found, outputs[1:], strict=True)):
        if expected is None:
            continue
        pattern = ".*?".join(re.escape(piece) for piece in expected.strip().split("..."))
        assert re.fullmatch(pattern, printed.strip(), flags=re.DOTALL), (
            f"example {index} printed\n{printed}\ninstead of\n{expected}\nfor\n{body}"
        )


def test_a_broken_example_fails_the_check(tmp_path):
    setup = '```python\nBASE_URL = "x"\nMODEL = "y"\nprint(MODEL, 2)\n```\n\n'
    check(setup + "```text\n'y' ...\n```\n", "unused", "'y'", tmp_path)  # injected, matched
    with pytest.raises(AssertionError, match="printed"):
        check(setup + "```text\n'y' 3\n```\n", "unused", "'y'", tmp_path)
    with pytest.raises(AssertionError, match="failed"):
        check(setup + "```python\nraise SystemExit(1)\n```\n", "unused", "y", tmp_path)
    with pytest.raises(AssertionError, match="BASE_URL"):
        check("```python\nprint(1)\n```\n", "unused", "y", tmp_path)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    # 4096 positions (the tiny model's own limit): the quickstart's document gets repeat queries.
    folder = tmp_path_factory.mktemp("docs")
    with served_tiny(tiny_llama_dir, folder, "--max-model-len", "4096") as base:
        yield base


@pytest.mark.slow
def test_quickstart_examples_run_and_print_what_they_show(server, tmp_path):
    check((DOCS / "quickstart.md").read_text(), f"{server}/v1", TINY, tmp_path)


@pytest.mark.slow
def test_api_reference_matches_the_servers_schema(server):
    rendered = openapi_doc.render(httpx.get(f"{server}/openapi.json", timeout=30).json())
    assert rendered == (DOCS / "api.md").read_text(), (
        "docs/api.md is out of date: serve a model and run "
        "`python -m vllm_compaction.server.openapi_doc http://HOST:PORT -o docs/api.md`"
    )
