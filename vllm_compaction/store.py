"""Handles on disk: one folder per handle, written so that a crash never leaves a loadable half.

    <root>/<handle id>/rank<r>.safetensors   a worker's compacted KV (its own KV heads)
    <root>/<handle id>/manifest.json         written last, by the API server; names every file
                                             with its sha256

A folder without a manifest is an interrupted compaction and is never loaded; a file whose
sha256 differs from the manifest's makes the handle lost, never wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from vllm_compaction.models import home

MANIFEST = "manifest.json"
# A handle's tensors, one of each per layer; "pages" only with per-head budgets.
PARTS = ("keys", "values", "bias", "pages")
REQUIRED_PARTS = PARTS[:3]


HANDLES_DIR_ENV = "VLLM_COMPACTION_HANDLES_DIR"


def handles_dir() -> Path:
    """Where handles are stored; VLLM_COMPACTION_HANDLES_DIR overrides the default."""
    return Path(os.environ.get(HANDLES_DIR_ENV, home() / "handles")).expanduser()


class CorruptHandle(Exception):
    """A stored handle that cannot be trusted: missing, truncated or altered files."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file, fsync and rename (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_layers(path: Path, layers: dict[str, list[torch.Tensor]]) -> str:
    """Store named per-layer tensor lists; returns the file's sha256."""
    tensors = {
        f"{name}.{i}": t.contiguous() for name, ts in layers.items() for i, t in enumerate(ts)
    }
    data = save(tensors)
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def load_layers(path: Path, sha256: str) -> dict[str, list[torch.Tensor]]:
    """Read what `save_layers` wrote (the PARTS it holds), refusing a file whose sha256 is not
    `sha256` or that lacks a required part."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CorruptHandle(f"{path.name} cannot be read: {error}") from error
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptHandle(f"{path.name} does not match its checksum")
    tensors = load(data)
    names = [name for name in PARTS if f"{name}.0" in tensors]
    if not set(REQUIRED_PARTS) <= set(names):
        raise CorruptHandle(f"{path.name} lacks a handle's keys, values or bias")
    count = len(tensors) // len(names)
    try:
        return {name: [tensors[f"{name}.{i}"] for i in range(count)] for name in names}
    except KeyError as error:
        raise CorruptHandle(f"{path.name} misses the tensor {error}") from error


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest, or None when the handle was never completed."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise CorruptHandle(f"manifest of {folder.name} is unreadable: {error}") from error


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def remove_tensors(folder: Path) -> None:
    """Free a handle's KV files and keep its manifest (an expired handle still says so)."""
    for path in folder.glob("*.safetensors"):
        path.unlink(missing_ok=True)


def model_fingerprint(model_dir: str) -> str:
    """Identifies a model's weights cheaply: its config and the names and sizes of its files."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(root.glob("*")):
        if path.suffix in {".json", ".safetensors", ".bin"} and path.is_file():
            digest.update(path.name.encode())
            digest.update(str(path.stat().st_size).encode())
            if path.name == "config.json":
                digest.update(path.read_bytes())
    return digest.hexdigest()
