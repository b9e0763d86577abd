"""Portable handles: one safetensors blob holding every worker's tensors and the manifest.

Tensors are named "<rank>/<part>.<layer>" (part: keys, values, bias); the manifest and a
checksum of the tensors are the blob's metadata. A server with a seal key seals what it exports
(AES-256-GCM: SEALED, a 12-byte nonce, then the ciphertext) and accepts only blobs sealed with
that key, so a blob can be neither read nor altered in transit, like OpenAI's encrypted_content.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import load, save
from torch import Tensor

from vllm_compaction.store import PARTS, REQUIRED_PARTS

SEALED = b"vllm-compaction/sealed/1\n"
SEAL_KEY_ENV = "VLLM_COMPACTION_SEAL_KEY_FILE"
_NONCE = 12

Layers = dict[str, list[Tensor]]  # part -> one tensor per layer


class BadBlob(ValueError):
    """A blob that is not a handle export, was altered, or is sealed with another key."""


def seal_key(env: Mapping[str, str] = os.environ) -> bytes | None:
    """The AES key derived from the file VLLM_COMPACTION_SEAL_KEY_FILE names (any secret)."""
    path = env.get(SEAL_KEY_ENV)
    if not path:
        return None
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as error:
        raise ValueError(f"cannot read the seal key file: {error}") from error
    if len(secret) < 16:
        raise ValueError(f"{path}: a seal key needs at least 16 bytes of secret")
    return hashlib.sha256(secret).digest()


def pack(manifest: dict[str, Any], ranks: list[Layers], key: bytes | None) -> bytes:
    tensors = {
        f"{rank}/{part}.{i}": tensor.contiguous()
        for rank, layers in enumerate(ranks)
        for part in PARTS
        for i, tensor in enumerate(layers.get(part, ()))
    }
    metadata = {"manifest": json.dumps(manifest), "sha256": _digest(tensors)}
    blob = save(tensors, metadata=metadata)
    if key is None:
        return blob
    nonce = secrets.token_bytes(_NONCE)
    return SEALED + nonce + AESGCM(key).encrypt(nonce, blob, SEALED)


def unpack(blob: bytes, key: bytes | None) -> tuple[dict[str, Any], list[Layers]]:
    """The manifest and each rank's tensors; BadBlob for anything else."""
    if blob.startswith(SEALED):
        if key is None:
            raise BadBlob("the blob is sealed and this server has no seal key")
        body = blob[len(SEALED) :]
        try:
            blob = AESGCM(key).decrypt(body[:_NONCE], body[_NONCE:], SEALED)
        except InvalidTag as error:
            raise BadBlob("the blob was altered or sealed with another key") from error
    elif key is not None:
        raise BadBlob("this server accepts only blobs sealed with its key")
    try:
        metadata = _metadata(blob)
        manifest = json.loads(metadata["manifest"])
        tensors = load(blob)
    except Exception as error:
        raise BadBlob(f"not a compaction export: {error}") from error
    if metadata.get("sha256") != _digest(tensors):
        raise BadBlob("the blob's tensors do not match its checksum")
    ranks: dict[int, Layers] = {}
    for name, tensor in tensors.items():
        rank, _, rest = name.partition("/")
        part, _, layer = rest.partition(".")
        if not (rank.isdigit() and part in PARTS and layer.isdigit()):
            raise BadBlob(f"unexpected tensor {name!r}")
        ranks.setdefault(int(rank), {}).setdefault(part, []).append((int(layer), tensor))
    if not isinstance(manifest, dict) or sorted(ranks) != list(range(len(ranks))) or not ranks:
        raise BadBlob("not a compaction export: no manifest or missing ranks")
    return manifest, [_ordered(ranks[r]) for r in range(len(ranks))]


def _ordered(layers: dict[str, list[tuple[int, Tensor]]]) -> Layers:
    """Each part's tensors by layer index; every part must hold layers 0..n-1."""
    if not set(REQUIRED_PARTS) <= set(layers):
        raise BadBlob("not a compaction export: a rank lacks keys, values or bias")
    out = {}
    for part, items in layers.items():
        items.sort(key=lambda item: item[0])
        if [i for i, _ in items] != list(range(len(items))):
            raise BadBlob(f"not a compaction export: {part} layers are missing")
        out[part] = [tensor for _, tensor in items]
    if len({len(tensors) for tensors in out.values()}) != 1:
        raise BadBlob("not a compaction export: parts hold different layer counts")
    return out


def _digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over names and raw bytes: catches corruption (only sealing stops forgery)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _metadata(blob: bytes) -> dict[str, str]:
    size = int.from_bytes(blob[:8], "little")
    if len(blob) < 8 + size:
        raise ValueError("truncated header")
    return json.loads(blob[8 : 8 + size]).get("__metadata__") or {}
