"""Run `vllm-compaction serve` as a real process on 127.0.0.1 for a test."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(str):
    """A served engine's base URL that can also kill the whole process group, as a crash would."""

    process: subprocess.Popen

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@contextlib.contextmanager
def served(
    args: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> Iterator[Server]:
    """Start `vllm-compaction serve ARGS` (or `command`), wait for /health, yield the base URL,
    stop it with SIGTERM."""
    port = free_port()
    cli = Path(sys.executable).with_name("vllm-compaction")
    cmd = [*(command or [str(cli), "serve", *args]), "--host", "127.0.0.1", "--port", str(port)]
    if shutil.which("setpriv"):  # a SIGKILLed pytest must not leave servers holding GBs behind
        cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: kill() reaches the engine too
        )
    base = Server(f"http://127.0.0.1:{port}")
    base.process = proc
    try:
        _wait_healthy(proc, base, log)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


TINY = "tiny"  # served name of the tiny random test model
# A handle of 60 target tokens on it: 64 slots x 4 layers x 2 KV heads x (64 + 64 fp32 dims +
# 1 fp32 bias) x 4 bytes.
TINY_HANDLE_BYTES = 64 * 4 * 2 * 129 * 4
RESIDENT = ("vllm_compaction:handle_bytes", ())  # metrics() keys of the store's gauges
ON_DISK = ("vllm_compaction:store_disk_bytes", ())


def served_tiny(
    model_dir: Path, folder: Path, *flags: str, log: str = "server.log", **env: str
) -> contextlib.AbstractContextManager[Server]:
    """The tiny test model (fp32, blocks of 32, 2048 positions) served with extra `flags`;
    its handles live in folder/handles, its log is folder/`log`."""
    args = [str(model_dir), "--served-model-name", TINY, "--dtype", "float32"]
    args += ["--block-size", "32", "--max-model-len", "2048", *flags]
    env = {"VLLM_COMPACTION_HANDLES_DIR": str(folder / "handles"), **env}
    return served(args, folder / log, env=env)


def continuation(client: Any, handle_id: str) -> tuple[str, list[float]]:
    """Greedy text and token logprobs of a short completion on a handle (an `openai` client)."""
    out = client.completions.create(
        model=TINY,
        prompt=" In short,",
        max_tokens=6,
        temperature=0,
        logprobs=1,
        extra_body={"compaction": handle_id},
    )
    return out.choices[0].text, out.choices[0].logprobs.token_logprobs


def _wait_healthy(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{base}/health", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    """The server's vllm_compaction:* samples, keyed by (name, sorted label items)."""
    text = httpx.get(f"{base}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("vllm_compaction:")
    }
