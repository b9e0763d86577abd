"""Prometheus metrics of compaction, served on vLLM's own /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

COMPACTIONS = Counter(
    "vllm_compaction:compactions_total", "Calls of /v1/compact", ["method", "outcome"]
)
TOKENS = Counter(
    "vllm_compaction:tokens_total",
    "Context tokens compacted (in) and compacted tokens produced (out)",
    ["direction"],
)
RATIO = Histogram(
    "vllm_compaction:ratio", "Compaction ratio of each handle", buckets=(1, 2, 5, 10, 20, 50, 100)
)
SECONDS = Histogram(
    "vllm_compaction:seconds",
    "Time of /v1/compact by stage (prefill with query capture, compaction, total)",
    ["stage"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300),
)
HANDLE_REQUESTS = Counter(
    "vllm_compaction:handle_requests_total", "Requests that continue from a handle", ["endpoint"]
)
HANDLES = Gauge(
    "vllm_compaction:handles", "Live handles (all stored on disk)", multiprocess_mode="livesum"
)
HANDLE_BYTES = Gauge(
    "vllm_compaction:handle_bytes",
    "Bytes of compacted KV resident in worker memory (all workers)",
    multiprocess_mode="livesum",
)
STORE_DISK_BYTES = Gauge(
    "vllm_compaction:store_disk_bytes", "Bytes of live handles on disk", multiprocess_mode="livesum"
)
STORE_HITS = Counter(
    "vllm_compaction:store_hits_total",
    "Uses of a handle, by where its KV was: worker memory or disk (loaded)",
    ["tier"],
)
STORE_EVICTIONS = Counter(
    "vllm_compaction:store_evictions_total",
    "Handles spilled from worker memory (memory) or removed from disk (disk) by the budgets",
    ["budget"],
)
ONLINE_COMPACTIONS = Counter(
    "vllm_compaction:online_compactions_total",
    "Compactions of a running request's own context (`context_management`)",
)
