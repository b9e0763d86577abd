"""The one exception our routes turn into OpenAI-shaped error answers."""

from __future__ import annotations


class CompactionError(Exception):
    """A request the server refuses; carries the HTTP status and the offending field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
