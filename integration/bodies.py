"""Request bodies read with a limit: a declared ``Content-Length`` past it is refused before
reading, and a body that grows past it while streaming is cut off (no body is ever held whole
beyond the limit). Each endpoint turns :class:`BodyRefused` into its own error shape (JSON,
OperationOutcome, a patient-facing page)."""

from __future__ import annotations

from starlette.requests import Request

__all__ = ["BodyRefused", "read_limited"]


class BodyRefused(Exception):
    """400 (a ``Content-Length`` that is not a number) or 413 (too large)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BodyRefused(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise BodyRefused(413, "body_too_large", f"the body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyRefused(413, "body_too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
