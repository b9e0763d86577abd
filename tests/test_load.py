"""Load: 16 concurrent clients send 200 mixed requests (compactions, completions and chats on
handles, exports, imports, deletes, plain requests, bad input) to one served tiny model whose
handle store has small memory and disk budgets.

Every answer must equal a sequential run: on a handle, the answer of a handle made alone from
the same document (before the load for the reference documents, after it for the others); a
plain request, its answer before the load. No response may be a 5xx, every refusal must be the
one its request calls for, and the store's gauges must stay inside the budgets.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from tests.compare import assert_same_greedy
from tests.server import ON_DISK, RESIDENT, TINY, TINY_HANDLE_BYTES, metrics, served_tiny
from vllm_compaction import documents

pytestmark = pytest.mark.slow
CLIENTS = 16
SEED = 20260611
# Requests of each kind in the load (200 in all); bad input covers nine refusals.
MIX = {
    "completion": 50,
    "chat": 30,
    "plain": 14,
    "compact": 22,
    "export": 14,
    "import": 16,
    "delete": 14,
    "bad": 40,
}
MEMORY_BUDGET = TINY_HANDLE_BYTES * 7 // 2  # three handles in worker memory
DISK_BUDGET = TINY_HANDLE_BYTES * 17 // 2  # eight on disk (a file adds a small header): evictions
RECENT = 8  # requests on handles pick among the newest this many
DOC_TOKENS = 240
REFERENCE_DOCS = 5  # documents compacted before the load; the others only during it
SAMPLING = {"model": TINY, "max_tokens": 6, "temperature": 0}
FOLLOW_UPS: dict[str, list[Any]] = {
    "prompt": [" In short,", " The answer is"],
    "messages": [
        [{"role": "user", "content": "What is it about?"}],
        [{"role": "user", "content": "Name one fact."}],
    ],
}
PLAIN = [" The history of", " In 1905 the city"]

Answer = tuple[list[str], list[dict[str, float]]]  # greedy tokens and their top logprobs


@dataclass(frozen=True)
class Doc:
    kind: str  # "prompt" (continued with completions) or "messages" (with chats)
    body: dict[str, Any]  # the /v1/compact request without the model


@dataclass(frozen=True)
class Handle:
    doc: int
    during_load: bool


@dataclass(frozen=True)
class Call:
    kind: str
    handle: str | None  # the handle it used, or made
    start: float
    end: float
    status: int


@dataclass
class Load:
    """What the clients share: the handles they know, blobs to import, and what they saw."""

    http: httpx.Client
    docs: list[Doc]
    lock: threading.RLock = field(default_factory=threading.RLock)
    handles: dict[str, Handle] = field(default_factory=dict)
    blobs: list[tuple[int, bytes]] = field(default_factory=list)
    deleting: dict[str, float] = field(default_factory=dict)  # id -> when its delete was sent
    deleted: dict[str, float] = field(default_factory=dict)  # id -> when it answered
    evicted: dict[str, float] = field(default_factory=dict)  # id -> its first 410
    calls: list[Call] = field(default_factory=list)
    seen: list[tuple[str, int, int, Answer]] = field(default_factory=list)  # id, doc, follow-up

    def call(
        self, kind: str, method: str, url: str, handle: str | None = None, **kw: Any
    ) -> tuple[httpx.Response, float, float]:
        """One request, timed and recorded; never a 5xx."""
        start = time.monotonic()
        response = self.http.request(method, url, **kw)
        end = time.monotonic()
        status = response.status_code
        if kind in ("compact", "import") and status == 200:
            handle = response.json()["id"]
        with self.lock:
            self.calls.append(Call(kind, handle, start, end, status))
        assert response.status_code < 500, (kind, url, response.status_code, response.text)
        return response, start, end

    def pick(self, rng: random.Random, kind: str | None, during_load: bool = False) -> str:
        """One of the newest handles believed live (of a doc kind; made during the load if asked
        and any is), else one that went away (evicted, else deleted). The oldest are the first
        evicted: most picks find their handle, some race its eviction."""
        with self.lock:
            mine = [
                h for h, info in self.handles.items() if kind in (None, self.docs[info.doc].kind)
            ]
            known = [h for h in mine if h not in self.deleting]
            live = [h for h in known if h not in self.evicted]
            recent = [h for h in live if self.handles[h].during_load]
            return rng.choice(((during_load and recent) or live or known or mine)[-RECENT:])

    def check_gone(self, handle: str, response: httpx.Response, end: float) -> bool:
        """Whether a handle answered as deleted (404) or evicted (410), each only if it may."""
        if response.status_code == 404:
            sent = self.deleting.get(handle)
            assert sent is not None and sent < end, f"{handle} unknown though never deleted"
            return True
        if response.status_code == 410:
            assert "evicted" in response.json()["error"]["message"], response.text
            with self.lock:
                self.evicted.setdefault(handle, end)
            return True
        return False

    def check_live(self, handle: str, start: float) -> None:
        """A handle that answered 200 was not deleted or evicted before the request began."""
        assert self.deleted.get(handle, start) >= start, f"{handle} answered after its delete"
        assert self.evicted.get(handle, start) >= start, f"{handle} answered after its 410"


def _steps(body: dict[str, Any]) -> Answer:
    logprobs = body["choices"][0]["logprobs"]
    if "content" in logprobs:  # a chat
        content = logprobs["content"]
        tops = [{t["token"]: t["logprob"] for t in step["top_logprobs"]} for step in content]
        return [step["token"] for step in content], tops
    return logprobs["tokens"], logprobs["top_logprobs"]


def _ask(kind: str, follow_up: int, handle: str | None = None) -> tuple[str, dict[str, Any]]:
    """A greedy completion (prompt handles, plain) or chat (messages handles) request."""
    extra = {"compaction": handle} if handle else {}
    if kind == "messages":
        body = {**SAMPLING, "messages": FOLLOW_UPS[kind][follow_up], "logprobs": True}
        return "/v1/chat/completions", {**body, "top_logprobs": 5, **extra}
    prompt = FOLLOW_UPS[kind][follow_up] if kind == "prompt" else PLAIN[follow_up]
    return "/v1/completions", {**SAMPLING, "prompt": prompt, "logprobs": 5, **extra}


def _answer(http: httpx.Client, kind: str, follow_up: int, handle: str | None = None) -> Answer:
    url, body = _ask(kind, follow_up, handle)
    response = http.post(url, json=body)
    assert response.status_code == 200, response.text
    return _steps(response.json())


def _compact(http: httpx.Client, doc: Doc) -> str:
    response = http.post("/v1/compact", json={"model": TINY, **doc.body})
    assert response.status_code == 200, response.text
    assert response.json()["compacted_tokens"] == 60
    return response.json()["id"]


def _references(http: httpx.Client, doc: Doc) -> list[Answer]:
    """A handle made alone from `doc` and its answer to each follow-up; the handle is deleted."""
    handle = _compact(http, doc)
    answers = [_answer(http, doc.kind, i, handle) for i in range(len(FOLLOW_UPS[doc.kind]))]
    assert http.delete(f"/v1/compactions/{handle}").status_code == 200
    return answers


# The load's requests: each checks its own outcome and records what later checks need.


def _use(load: Load, rng: random.Random, kind: str) -> None:
    handle = load.pick(rng, kind)
    follow_up = rng.randrange(len(FOLLOW_UPS[kind]))
    url, body = _ask(kind, follow_up, handle)
    response, start, end = load.call(kind, "POST", url, handle, json=body)
    if not load.check_gone(handle, response, end):
        assert response.status_code == 200, response.text
        load.check_live(handle, start)
        with load.lock:
            load.seen.append((handle, load.handles[handle].doc, follow_up, _steps(response.json())))


def _plain(load: Load, rng: random.Random) -> None:
    follow_up = rng.randrange(len(PLAIN))
    url, body = _ask("plain", follow_up)
    response, _, _ = load.call("plain", "POST", url, json=body)
    assert response.status_code == 200, response.text
    with load.lock:
        load.seen.append(("", -1, follow_up, _steps(response.json())))


def _compaction(load: Load, rng: random.Random) -> None:
    doc = rng.randrange(len(load.docs))
    body = {"model": TINY, **load.docs[doc].body}
    response, _, _ = load.call("compact", "POST", "/v1/compact", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["compacted_tokens"] == 60
    with load.lock:
        load.handles[response.json()["id"]] = Handle(doc, during_load=True)


def _export(load: Load, rng: random.Random) -> None:
    handle = load.pick(rng, None)
    url = f"/v1/compactions/{handle}/content"
    response, start, end = load.call("export", "GET", url, handle)
    if not load.check_gone(handle, response, end):
        assert response.status_code == 200, response.text
        load.check_live(handle, start)
        with load.lock:
            load.blobs.append((load.handles[handle].doc, response.content))


def _import(load: Load, rng: random.Random) -> None:
    with load.lock:
        doc, blob = rng.choice(load.blobs)
    response, _, _ = load.call("import", "POST", "/v1/compactions", content=blob)
    assert response.status_code == 200, response.text
    with load.lock:
        load.handles[response.json()["id"]] = Handle(doc, during_load=True)


def _delete(load: Load, rng: random.Random) -> None:
    with load.lock:  # picked and marked at once: each handle is deleted by one client
        handle = load.pick(rng, None, during_load=True)
        load.deleting[handle] = time.monotonic()
    response, _, end = load.call("delete", "DELETE", f"/v1/compactions/{handle}", handle)
    if response.status_code == 410:  # evicted before its delete
        load.check_gone(handle, response, end)
        return
    assert response.status_code == 200, response.text
    assert response.json() == {"id": handle, "object": "compaction.deleted", "deleted": True}
    with load.lock:
        load.deleted[handle] = end


def _bad(load: Load, rng: random.Random) -> None:
    """One of eight refusals: unknown ids, malformed bodies, altered or garbage blobs."""
    unknown = "cmp_" + rng.randbytes(8).hex()
    with load.lock:
        tampered = bytearray(rng.choice(load.blobs)[1])
    tampered[-3] ^= 0x40  # a tensor byte: the checksum no longer matches
    json_body = {"headers": {"content-type": "application/json"}}
    refusals: list[tuple[str, str, dict[str, Any], tuple[int, ...]]] = [
        ("POST", "/v1/completions", {"json": _ask("prompt", 0, unknown)[1]}, (404,)),
        ("POST", "/v1/chat/completions", {"json": _ask("messages", 0, unknown)[1]}, (404,)),
        ("GET", f"/v1/compactions/{unknown}/content", {}, (404,)),
        ("DELETE", f"/v1/compactions/{unknown}", {}, (404,)),
        ("POST", "/v1/compact", {"content": b'{"prompt": [1, 2', **json_body}, (400, 422)),
        ("POST", "/v1/compact", {"json": {"model": TINY, "prompt": "a b", "ratio": 0.5}}, (400,)),
        ("POST", "/v1/compactions", {"content": bytes(tampered)}, (400,)),
        ("POST", "/v1/compactions", {"content": rng.randbytes(256)}, (400,)),
    ]
    method, url, kw, expected = rng.choice(refusals)
    response, _, _ = load.call("bad", method, url, **kw)
    assert response.status_code in expected, (url, response.status_code, response.text)
    assert set(response.json()["error"]) >= {"message", "type", "code"}, response.text


def _wrong_kind(load: Load, rng: random.Random) -> None:
    """A chat on a prompt handle: refused after the handle was acquired."""
    handle = load.pick(rng, "prompt")
    url, body = _ask("messages", 0, handle)
    response, _, end = load.call("bad", "POST", url, handle, json=body)
    if not load.check_gone(handle, response, end):
        assert response.status_code == 400 and "use it with /v1/completions" in response.text


OPS: dict[str, Callable[[Load, random.Random], None]] = {
    "completion": lambda load, rng: _use(load, rng, "prompt"),
    "chat": lambda load, rng: _use(load, rng, "messages"),
    "plain": _plain,
    "compact": _compaction,
    "export": _export,
    "import": _import,
    "delete": _delete,
    "bad": lambda load, rng: (_wrong_kind if rng.random() < 0.2 else _bad)(load, rng),
}


# The served model and what the load is checked against.


@pytest.fixture(scope="module")
def docs(tiny_llama_dir) -> list[Doc]:
    """Eleven 240-token windows of SQuAD, as prompt handles (target or ratio) or chats."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = " ".join(p["context"] for a in documents.squad()["data"][6:9] for p in a["paragraphs"])
    ids = tokenizer(text)["input_ids"]
    windows = [ids[i * DOC_TOKENS : (i + 1) * DOC_TOKENS] for i in range(11)]
    out = []
    for i, window in enumerate(windows):
        if i % 3 == 2:  # the chat template's tokens are kept verbatim: a target, not a ratio
            content = f"Read this:\n{tokenizer.decode(window)}"
            body = {"messages": [{"role": "user", "content": content}], "target_tokens": 60}
            out.append(Doc("messages", {**body, "queries": "context"}))
        else:  # 240 / 4 and the target both make 60 compacted tokens in 64 slots
            budget = {"ratio": 4} if i % 2 else {"target_tokens": 60}
            out.append(Doc("prompt", {"prompt": window, **budget, "queries": "context"}))
    return out


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("load")
    # Small prefill chunks: several requests share each engine step.
    flags = ["--max-num-batched-tokens", "128"]
    budgets = {
        "VLLM_COMPACTION_MEMORY_BYTES": str(MEMORY_BUDGET),
        "VLLM_COMPACTION_DISK_BYTES": str(DISK_BUDGET),
    }
    with served_tiny(tiny_llama_dir, folder, *flags, **budgets) as base:
        yield base, folder / "handles"


Sample = tuple[float, float, float, float]  # taken from, until; bytes in memory, on disk


def _monitor(base: str, stop: threading.Event, samples: list[Sample]) -> None:
    """Sample the store's gauges, with the time window each sample was taken in."""
    while not stop.is_set():
        start = time.monotonic()
        values = metrics(base)
        samples.append((start, time.monotonic(), values[RESIDENT], values[ON_DISK]))
        stop.wait(0.02)


def _overlapping(calls: list[Call], kinds: set[str], start: float, end: float) -> set[str]:
    """Handles that requests of these kinds were running on between `start` and `end`."""
    return {
        c.handle
        for c in calls
        if c.handle and c.kind in kinds and c.start <= end and c.end >= start
    }


def test_concurrent_mixed_load_is_correct_and_stays_inside_the_budgets(server, docs):
    base, handles_dir = server
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    with httpx.Client(base_url=base, timeout=300, limits=limits) as http:
        _run_and_check(Load(http, docs), base, handles_dir)


def _run_and_check(load: Load, base: str, handles_dir: Path) -> None:
    http, docs = load.http, load.docs
    # Sequential references: each reference document's handle, its answers and an export.
    references: dict[int, list[Answer]] = {}
    for index, doc in enumerate(docs[:REFERENCE_DOCS]):
        handle = _compact(http, doc)
        references[index] = [
            _answer(http, doc.kind, i, handle) for i in range(len(FOLLOW_UPS[doc.kind]))
        ]
        load.handles[handle] = Handle(index, during_load=False)
        load.blobs.append((index, http.get(f"/v1/compactions/{handle}/content").content))
    plain = [_answer(http, "plain", i) for i in range(len(PLAIN))]
    handle_disk_bytes = metrics(base)[ON_DISK] / REFERENCE_DOCS

    rng = random.Random(SEED)
    plan = [kind for kind, count in MIX.items() for _ in range(count)]
    rng.shuffle(plan)
    stop = threading.Event()
    samples: list[Sample] = []
    monitor = threading.Thread(target=_monitor, args=(base, stop, samples))
    monitor.start()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        futures: list[Future] = [
            pool.submit(OPS[kind], load, random.Random(rng.getrandbits(64))) for kind in plan
        ]
    stop.set()
    monitor.join()
    failures = [
        f"{kind}: {f.exception()!r}" for kind, f in zip(plan, futures, strict=True) if f.exception()
    ]
    assert not failures, "\n".join(failures)
    assert len(load.calls) == len(plan) and max(c.status for c in load.calls) < 500
    assert samples, "the monitor took no sample"

    # Budgets: above one only by the handles requests were using (or making) meanwhile.
    uses = {"prompt", "messages", "compact", "import", "bad"}
    for start, end, resident, on_disk in samples:
        in_use = _overlapping(load.calls, uses, start, end)
        assert resident <= MEMORY_BUDGET + TINY_HANDLE_BYTES * len(in_use), (
            start,
            resident,
            in_use,
        )
        # A new handle is counted on disk before the oldest make room for it.
        made = _overlapping(load.calls, {"compact", "import"}, start, end)
        assert on_disk <= DISK_BUDGET + handle_disk_bytes * len(made), (start, on_disk, made)
    idle = metrics(base)
    assert idle[RESIDENT] <= MEMORY_BUDGET and idle[ON_DISK] <= DISK_BUDGET
    files = sum(f.stat().st_size for f in handles_dir.glob("cmp_*/*.safetensors"))
    assert files == idle[ON_DISK]
    # The load did what it is for: both budgets evicted, and at least every handle that
    # answered as evicted left the disk.
    evictions = {
        budget: idle[("vllm_compaction:store_evictions_total", (("budget", budget),))]
        for budget in ("memory", "disk")
    }
    assert evictions["memory"] > 0 and evictions["disk"] >= max(1, len(load.evicted))

    # Answers: the documents compacted only during the load get their references now.
    assert len(load.seen) >= MIX["plain"] + (MIX["completion"] + MIX["chat"]) // 2
    for doc in sorted({doc for _, doc, _, _ in load.seen} - {-1, *references}):
        references[doc] = _references(http, docs[doc])
    for handle, doc, follow_up, (tokens, top) in load.seen:
        expected = plain[follow_up] if doc == -1 else references[doc][follow_up]
        try:
            assert_same_greedy(tokens, top, *expected, atol=1e-3)
        except AssertionError as error:
            raise AssertionError(f"{handle} (doc {doc}, follow-up {follow_up})") from error

    # Gone handles stay gone, each for its reason; the server goes on.
    for handle in load.deleted:
        assert http.get(f"/v1/compactions/{handle}").status_code == 404
    for handle in load.evicted:
        assert http.get(f"/v1/compactions/{handle}").status_code == 410
    assert http.get("/health").status_code == 200
    tokens, top = _answer(http, "plain", 0)
    assert_same_greedy(tokens, top, *plain[0], atol=1e-3)
