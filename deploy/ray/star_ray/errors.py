"""Error shapes and the exception a model replica raises when its `star-run serve` child is gone.

The Ray app answers its own errors in OpenAI's shape, as the child does:
`{"error": {"message", "type", "param", "code"}}` with `code` a string or null.
"""

from __future__ import annotations

import json
from typing import Optional


class ChildUnavailable(Exception):
    """The replica's `star-run serve` child could not answer (exited, refused the connection,
    or closed it mid-response). The ingress retries such a request on another replica."""


def openai_error_body(
    message: str,
    kind: str,
    code: Optional[str] = None,
    param: Optional[str] = None,
) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}
    ).encode()


def sse_error_event(message: str, kind: str = "server_error", code: Optional[str] = None) -> bytes:
    """An OpenAI streaming `error` event (what the child itself sends when a streamed request
    fails): the SDK raises it as an APIError."""
    data = {
        "type": "error",
        "error": {"message": message, "type": kind, "param": None, "code": code},
    }
    return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"
