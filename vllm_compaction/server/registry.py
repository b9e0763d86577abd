"""Handles' lifecycle in the API server: who owns them, where their KV is, and the limits.

Every handle is on disk (store.py); the hot ones are also held by the workers, and the least
recently used are spilled (dropped from worker memory, reloaded on next use) once they pass the
memory budget. The oldest leave the disk once it passes the disk budget. A handle that is gone
(expired, evicted, lost) keeps a small tombstone so its owner learns why (410) for a week; any
other caller, and the owner after that, gets the 404 of an id that never existed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vllm_compaction import portable, store
from vllm_compaction.server import metrics
from vllm_compaction.server.errors import CompactionError
from vllm_compaction.server.protocol import Compaction, CompactionList

logger = logging.getLogger(f"vllm.{__name__}")

MEMORY_ENV = "VLLM_COMPACTION_MEMORY_BYTES"
DISK_ENV = "VLLM_COMPACTION_DISK_BYTES"
DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_DISK_BYTES = 20 << 30
# How long a gone handle answers its owner 410 before it is forgotten (404): long enough for a
# client to learn why, short enough that a busy server's tombstones do not pile up.
TOMBSTONE_SECONDS = 7 * 86400


def new_handle_id() -> str:
    return "cmp_" + secrets.token_urlsafe(24)  # 192 random bits


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = DEFAULT_MEMORY_BYTES  # compacted KV held by the workers, all of them
    disk_bytes: int = DEFAULT_DISK_BYTES  # the store's tensor files

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Limits:
        """The budgets from the environment; ValueError naming the variable if malformed."""
        values = []
        for name, default in ((MEMORY_ENV, DEFAULT_MEMORY_BYTES), (DISK_ENV, DEFAULT_DISK_BYTES)):
            value = env.get(name, str(default))
            if not value.isdigit():
                raise ValueError(f"{name} must be a number of bytes, got {value!r}")
            values.append(int(value))
        return cls(*values)


@dataclass
class HandleRecord:
    info: Compaction
    prefix_ids: list[int]  # the context's tokens: a chat that continues it must start with them
    slots: int
    bytes: int  # compacted KV held in worker memory, all workers
    tenant: str
    messages: list[dict[str, Any]] | None = None  # what a "messages" handle was made from
    created_ns: int = field(default_factory=time.time_ns)  # orders handles made in one second
    disk_bytes: int = 0

    def expired(self) -> bool:
        return self.info.expires_at <= time.time()

    def to_json(self) -> dict[str, Any]:
        return {
            "info": self.info.model_dump(),
            "prefix_ids": self.prefix_ids,
            "slots": self.slots,
            "bytes": self.bytes,
            "tenant": self.tenant,
            "messages": self.messages,
            "created_ns": self.created_ns,
            "disk_bytes": self.disk_bytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HandleRecord:
        return cls(
            Compaction(**{"slots": data["slots"], **data["info"]}),  # older ones lack it
            [int(i) for i in data["prefix_ids"]],
            int(data["slots"]),
            int(data["bytes"]),
            str(data["tenant"]),
            data["messages"],
            int(data["created_ns"]),
            int(data.get("disk_bytes", 0)),
        )


class HandleRegistry:
    def __init__(
        self,
        engine: Any,
        root: Path,
        fingerprint: str,
        limits: Limits,
        workers: int,
        seal_key: bytes | None = None,
        model_facts: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.root = root
        self.fingerprint = fingerprint
        self.limits = limits
        self.workers = workers
        self.seal_key = seal_key
        self.model_facts = model_facts or {}
        self.stored: dict[str, HandleRecord] = {}  # every live handle (all are on disk)
        self.resident: OrderedDict[str, int] = OrderedDict()  # held by workers, LRU first
        # id -> (tenant, why, buried at or None: kept for a server of other weights or size),
        # for the owner's 410.
        self.gone: dict[str, tuple[str, str, float | None]] = {}
        self.in_use: Counter[str] = Counter()  # requests running on a handle
        self.unwanted: set[str] = set()  # resident, no longer stored: freed after the last use
        self._scan()
        logger.info(
            "handle store %s: %d handles, budgets %d bytes in memory, %d on disk, %s",
            root,
            len(self.stored),
            limits.memory_bytes,
            limits.disk_bytes,
            "sealed exports" if seal_key else "unsealed exports",
        )

    # Lookups.

    def owned(self, handle_id: str, tenant: str) -> HandleRecord:
        """The tenant's live handle, without bringing its KV to the workers."""
        record = self.stored.get(handle_id)
        if record is None or record.tenant != tenant:
            owner, why, _ = self.gone.get(handle_id, (None, "", None))
            if owner == tenant:
                raise CompactionError(f"compaction {handle_id} {why}", 410, "compaction")
            raise CompactionError(f"no compaction {handle_id!r}", 404, "compaction")
        if record.expired():
            self._bury(record, _expiry(record))
            raise CompactionError(f"compaction {handle_id} {_expiry(record)}", 410, "compaction")
        return record

    async def get(self, handle_id: str, tenant: str) -> HandleRecord:
        """The tenant's handle with its KV held by the workers (loaded from disk if spilled)."""
        record = self.owned(handle_id, tenant)
        if handle_id in self.resident:
            self.resident.move_to_end(handle_id)
            metrics.STORE_HITS.labels("memory").inc()
            return record
        folder = self.root / handle_id
        try:
            await self.engine.collective_rpc(
                "compaction_load", args=(handle_id, str(folder), _manifest(folder)["files"])
            )
        except Exception as error:  # corrupt, truncated or foreign: lost, never wrong KV
            raise self._lost(record, tenant, error) from error
        if self.stored.get(handle_id) is not record:  # deleted or evicted during the load
            await self.engine.collective_rpc("compaction_delete", args=(handle_id,))
            self.owned(handle_id, tenant)
        metrics.STORE_HITS.labels("disk").inc()
        self._hold(handle_id, record.bytes)
        await self._spill(keep=handle_id)
        return record

    def list(self, tenant: str, limit: int, after: str | None) -> CompactionList:
        """The tenant's live handles, oldest first."""
        mine = sorted(
            (r for r in self.stored.values() if r.tenant == tenant and not r.expired()),
            key=lambda r: (r.created_ns, r.info.id),
        )
        infos = [record.info for record in mine]
        if after is not None:
            ids = [info.id for info in infos]
            if after not in ids:
                raise CompactionError(f"no compaction {after!r}", 404, "after")
            infos = infos[ids.index(after) + 1 :]
        page = infos[:limit]
        return CompactionList(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=len(infos) > limit,
        )

    # Changes.

    async def add(self, record: HandleRecord) -> None:
        """Store a handle the workers hold (each worker its file, the manifest last)."""
        handle_id = record.info.id
        folder = self.root / handle_id
        self._hold(handle_id, record.bytes)
        try:
            files = await self.engine.collective_rpc(
                "compaction_save", args=(handle_id, str(folder))
            )
            await self._write_manifest(record, files)
        except Exception as error:
            self.unwanted.add(handle_id)
            await self._free_if_unused(handle_id)
            store.remove(folder)
            raise CompactionError(f"could not store the handle: {error}", 500) from error
        await self._register(record)

    async def export(self, handle_id: str, tenant: str) -> bytes:
        """The handle as a portable blob (sealed when the server has a seal key)."""
        record = self.owned(handle_id, tenant)
        folder = self.root / handle_id
        try:
            ranks = await asyncio.to_thread(_read_tensors, folder)
        except Exception as error:
            raise self._lost(record, tenant, error) from error
        portable_manifest = {"fingerprint": self.fingerprint, **record.to_json(), "tenant": ""}
        return await asyncio.to_thread(portable.pack, portable_manifest, ranks, self.seal_key)

    async def import_blob(self, blob: bytes, tenant: str) -> Compaction:
        """A new handle of `tenant` from an exported blob made with this model."""
        try:
            manifest, ranks = await asyncio.to_thread(portable.unpack, blob, self.seal_key)
            if manifest.get("fingerprint") != self.fingerprint:
                raise portable.BadBlob("it was made with other model weights")
            source = HandleRecord.from_json(manifest)
        except (portable.BadBlob, KeyError, TypeError, ValueError) as error:
            raise CompactionError(f"cannot import the blob: {error}") from error
        if len(ranks) != self.workers:
            raise CompactionError(
                f"cannot import the blob: {_other_split(len(ranks), self.workers)}"
            )
        if source.expired():
            raise CompactionError(f"cannot import the blob: the handle {_expiry(source)}")
        handle_id = new_handle_id()
        record = HandleRecord(
            source.info.model_copy(update={"id": handle_id}),
            source.prefix_ids,
            slots=ranks[0]["keys"][0].shape[1],
            bytes=sum(t.nbytes for layers in ranks for part in layers.values() for t in part),
            tenant=tenant,
            messages=source.messages,
        )
        folder = self.root / handle_id
        try:
            files = await asyncio.to_thread(_write_tensors, folder, ranks)
            await self.engine.collective_rpc(
                "compaction_load", args=(handle_id, str(folder), files)
            )
        except Exception as error:
            await self.engine.collective_rpc("compaction_delete", args=(handle_id,))
            store.remove(folder)
            raise CompactionError(f"cannot import the blob: {error}") from error
        self._hold(handle_id, record.bytes)
        await self._write_manifest(record, files)
        await self._register(record)
        return record.info

    async def delete(self, handle_id: str, tenant: str) -> None:
        self.owned(handle_id, tenant)
        del self.stored[handle_id]
        store.remove(self.root / handle_id)
        self.unwanted.add(handle_id)
        await self._free_if_unused(handle_id)

    def acquire(self, handle_id: str) -> None:
        self.in_use[handle_id] += 1

    async def release(self, handle_id: str) -> None:
        self.in_use[handle_id] -= 1
        if self.in_use[handle_id] <= 0:
            del self.in_use[handle_id]
        await self._free_if_unused(handle_id)
        await self._spill()

    # Internals.

    def _lost(self, record: HandleRecord, tenant: str, error: Exception) -> CompactionError:
        """The answer for a handle whose files failed us: its 404/410 if it was deleted or
        evicted meanwhile, else 'lost' (it is buried: never wrong KV)."""
        if self.stored.get(record.info.id) is not record:
            self.owned(record.info.id, tenant)
        why = f"is lost: {error}"
        self._bury(record, why)
        return CompactionError(f"compaction {record.info.id} {why}", 410, "compaction")

    async def _write_manifest(self, record: HandleRecord, files: list[dict[str, str]]) -> None:
        """The manifest goes last: a folder without one was never completed."""
        folder = self.root / record.info.id
        record.disk_bytes = sum((folder / f["file"]).stat().st_size for f in files)
        manifest = {
            "fingerprint": self.fingerprint,
            "model_facts": self.model_facts,
            # Keys carry the rotation of their slot: original position + (slots - T).
            "rope_shift": record.slots - record.info.original_tokens,
            "files": files,
            **record.to_json(),
        }
        await asyncio.to_thread(store.write_manifest, folder, manifest)

    async def _register(self, record: HandleRecord) -> None:
        self.stored[record.info.id] = record
        self._sync_gauges()
        for stale in [r for r in self.stored.values() if r.expired()]:
            self._bury(stale, _expiry(stale))
        self._forget_old_tombstones()
        await self._spill(keep=record.info.id)
        self._evict_disk(keep=record.info.id)

    def _hold(self, handle_id: str, size: int) -> None:
        self.resident[handle_id] = size
        self.resident.move_to_end(handle_id)
        self._sync_gauges()

    async def _free_if_unused(self, handle_id: str) -> None:
        if handle_id in self.unwanted and not self.in_use[handle_id]:
            self.unwanted.discard(handle_id)
            self.resident.pop(handle_id, None)
            self._sync_gauges()
            await self.engine.collective_rpc("compaction_delete", args=(handle_id,))

    async def _spill(self, keep: str | None = None) -> None:
        """Drop least recently used handles from worker memory until under the budget."""
        for handle_id in list(self.resident):
            if sum(self.resident.values()) <= self.limits.memory_bytes:
                return
            if handle_id == keep or self.in_use[handle_id] or handle_id in self.unwanted:
                continue
            if self.resident.pop(handle_id, None) is None:  # a concurrent spill took it
                continue
            metrics.STORE_EVICTIONS.labels("memory").inc()
            self._sync_gauges()
            await self.engine.collective_rpc("compaction_delete", args=(handle_id,))

    def _evict_disk(self, keep: str) -> None:
        """Bury the oldest handles until the store is under its disk budget."""
        for record in sorted(self.stored.values(), key=lambda r: r.created_ns):
            if self._disk_bytes() <= self.limits.disk_bytes:
                return
            if record.info.id != keep:
                metrics.STORE_EVICTIONS.labels("disk").inc()
                self._bury(record, "was evicted: the server's handle store is full")

    def _bury(self, record: HandleRecord, why: str) -> None:
        """Replace a handle by its tombstone; its KV leaves memory after the last use."""
        handle_id = record.info.id
        self.stored.pop(handle_id, None)
        buried = time.time()
        self.gone[handle_id] = (record.tenant, why, buried)
        folder = self.root / handle_id
        store.remove_tensors(folder)
        store.write_manifest(folder, {"tenant": record.tenant, "gone": why, "buried_at": buried})
        if handle_id in self.resident:
            self.unwanted.add(handle_id)
            if not self.in_use[handle_id]:  # freed by the next release or spill otherwise
                asyncio.get_running_loop().create_task(self._free_if_unused(handle_id))
        self._sync_gauges()

    def _scan(self) -> None:
        """Index the store at start-up; folders without a manifest are interrupted writes."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in self.root.glob("cmp_*"):
            try:
                manifest = store.read_manifest(folder)
            except store.CorruptHandle as error:
                logger.warning("ignoring %s: %s", folder, error)
                continue
            if manifest is None:
                store.remove(folder)
                continue
            try:
                if "gone" in manifest:
                    # A tombstone from before burial times were recorded counts from now.
                    buried = float(manifest.get("buried_at", time.time()))
                    self.gone[folder.name] = (manifest["tenant"], manifest["gone"], buried)
                    continue
                record = HandleRecord.from_json(manifest)
                made_by = len(manifest["files"])
            except (KeyError, TypeError, ValueError) as error:
                logger.warning("ignoring %s: %s", folder, error)
                continue
            if manifest.get("fingerprint") != self.fingerprint:
                # Another model's handle (the directory may be shared): not ours to remove.
                why = "is lost: made with other model weights"
                self.gone[folder.name] = (record.tenant, why, None)
            elif made_by != self.workers:
                # Intact but split for another worker count: kept for a server of that size.
                why = f"is unavailable here: {_other_split(made_by, self.workers)}"
                self.gone[folder.name] = (record.tenant, why, None)
            elif record.expired():
                self._bury(record, _expiry(record))
            else:
                self.stored[folder.name] = record
        self._forget_old_tombstones()
        self._sync_gauges()

    def _forget_old_tombstones(self) -> None:
        """Remove the tombstones older than TOMBSTONE_SECONDS, folder and all."""
        cutoff = time.time() - TOMBSTONE_SECONDS
        for handle_id, (_, _, buried) in list(self.gone.items()):
            if buried is not None and buried < cutoff:
                del self.gone[handle_id]
                store.remove(self.root / handle_id)

    def _disk_bytes(self) -> int:
        return sum(record.disk_bytes for record in self.stored.values())

    def _sync_gauges(self) -> None:
        metrics.HANDLES.set(len(self.stored))
        metrics.HANDLE_BYTES.set(sum(self.resident.values()))
        metrics.STORE_DISK_BYTES.set(self._disk_bytes())


def _manifest(folder: Path) -> dict[str, Any]:
    manifest = store.read_manifest(folder)
    if manifest is None:
        raise store.CorruptHandle("its manifest is missing")
    return manifest


def _read_tensors(folder: Path) -> list[portable.Layers]:
    """Every worker's tensors of a stored handle, checked against the manifest."""
    files = _manifest(folder)["files"]
    return [store.load_layers(folder / f["file"], f["sha256"]) for f in files]


def _write_tensors(folder: Path, ranks: list[portable.Layers]) -> list[dict[str, str]]:
    """One file per worker, as compaction_save writes them; the manifest's file entries."""
    names = [f"rank{rank}.safetensors" for rank in range(len(ranks))]
    return [
        {"file": name, "sha256": store.save_layers(folder / name, layers)}
        for name, layers in zip(names, ranks, strict=True)
    ]


def _other_split(made_by: int, workers: int) -> str:
    """Why a handle's tensors do not fit: each worker holds only its own KV heads."""
    return (
        f"it holds {made_by} workers' KV (tensor-parallel size {made_by}); this server has "
        f"{workers}"
    )


def _expiry(record: HandleRecord) -> str:
    return f"expired at {datetime.fromtimestamp(record.info.expires_at, UTC).isoformat()}"
