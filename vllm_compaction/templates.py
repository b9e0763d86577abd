"""Which tokens of a chat-templated text are template (kept verbatim) and which are content."""

from __future__ import annotations

from collections.abc import Sequence


def verbatim_spans(offsets: Sequence[tuple[int, int]], text: str, bodies: Sequence[str]):
    """Spans [start, end) of tokens not lying inside any of `bodies`, found in order in `text`.

    offsets: each token's character span in `text` (a fast tokenizer's offset mapping).
    Template tokens (role headers, separators, a default system prompt) cost little and
    cutting them hurts more than it saves, so callers keep them verbatim.
    """
    regions, cursor = [], 0
    for body in bodies:
        start = text.find(body, cursor) if body else -1
        if start < 0:
            continue
        regions.append((start, start + len(body)))
        cursor = start + len(body)
    inside = [any(a >= s and b <= e for s, e in regions) for a, b in offsets]
    spans, start = [], None
    for i, flag in enumerate([*inside, True]):
        if not flag and start is None:
            start = i
        elif flag and start is not None:
            spans.append((start, i))
            start = None
    return spans
