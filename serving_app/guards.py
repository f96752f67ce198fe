"""Requests Connexion's validation cannot judge: refused with a 4xx problem before it sees them.

A body that is not UTF-8, nests deeper than any schema here allows, or holds a lone surrogate
(``"\\ud800"`` is valid JSON but no Unicode text: it cannot be embedded, stored or echoed) would
otherwise fail inside the JSON decoder or a backend as a 500.
"""
from __future__ import annotations

import json
import re

MAX_DEPTH = 32  # the deepest schema (a search's filters) nests 4 levels
MAX_BODY = 1 << 20  # bytes; the largest valid body (a 20,000-character document) is far below
JSON_TYPES = (b"application/json", b"application/problem+json")
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def body_problem(body: bytes) -> str | None:
    """Why ``body`` is refused, or None."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not UTF-8 (byte {exc.start}: {body[exc.start:exc.start + 1]!r})"
    if _depth(text) > MAX_DEPTH:
        return f"the request body is nested deeper than {MAX_DEPTH} levels"
    try:
        json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")  # small bodies: cheap
    except UnicodeEncodeError as exc:  # before ValueError, its base class
        return f"the request body holds a lone surrogate ({exc.object[exc.start:exc.end]!r}), which is not text"
    except ValueError:
        return None  # malformed JSON: Connexion's own 400 says where
    return None


def _depth(text: str) -> int:
    """Bracket nesting outside strings, in one pass (before a recursive decoder runs out of stack)."""
    deepest = depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


class RequestBodyGuard:
    """ASGI middleware: buffer a JSON request's body, refuse it with a 400 problem when
    :func:`body_problem` finds one, else pass it on unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and CONTROL_CHARACTER.search(scope.get("path", "")):
            # No operation's path parameter allows one; Connexion's router then finds no operation
            # while Flask's does, and the view fails outside Connexion's context (a 500).
            return await _refuse(send, "the request path holds a control character", 404, "Not Found")
        if scope["type"] != "http" or not _is_json(scope):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                return await _refuse(send, f"the request body is larger than {MAX_BODY} bytes", 413,
                                     "Payload Too Large")
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = body_problem(body) if body else None
        if problem:
            return await _refuse(send, problem)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)


def _is_json(scope) -> bool:
    content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
    return content_type.split(b";")[0].strip().lower() in JSON_TYPES


async def _refuse(send, detail: str, status: int = 400, title: str = "Bad Request") -> None:
    payload = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/problem+json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
