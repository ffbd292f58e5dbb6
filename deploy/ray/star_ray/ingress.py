"""The ingress deployment: HTTP in, one model replica out (through a DeploymentHandle).

What it adds to `star-run serve`, and nothing else:
- a random `seed` for an images request without one, so that a retry draws the same image;
- retries: a request whose replica, node or child died before it was answered runs again on
  another replica (at most `retry_attempts` tries in all), so the client sees one success;
- backpressure: when every replica is full and `max_queued_requests` more wait here, Ray's
  BackPressureError becomes OpenAI's 429 with Retry-After (a child's own 429 passes through);
- the routes the Ray app does not serve (async jobs: their state lives in one child) answer an
  OpenAI-shaped 404 that says so.

Streamed requests (`stream: true`) are retried from the beginning only while nothing has been
sent to the client; the response starts with the first event. A replica lost after that ends
the stream with an OpenAI `error` event (code `replica_failed`) naming the seed to retry with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Dict, Optional, Tuple

import ray.exceptions as rex
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .errors import ChildUnavailable, openai_error_body, sse_error_event

logger = logging.getLogger("ray.serve")

GENERATIONS = "/v1/images/generations"
# Seeds the ingress draws: below 2^53, so that every JSON client reads them exactly.
SEED_LIMIT = 1 << 53

# A call that failed with one of these never reached a working server (or lost it before it
# answered): running it again elsewhere is safe, generation being deterministic given the seed.
RETRYABLE = (
    ChildUnavailable,
    rex.RayActorError,  # ActorDiedError, ActorUnavailableError
    rex.WorkerCrashedError,
    rex.NodeDiedError,
    rex.ObjectLostError,
    rex.OwnerDiedError,
)


def _is_retryable(e: BaseException) -> bool:
    if isinstance(e, RETRYABLE):
        return True
    cause = getattr(e, "cause", None)
    return cause is not None and cause is not e and isinstance(cause, RETRYABLE)


def _json_response(status: int, body: bytes, headers: Optional[Dict[str, str]] = None) -> Response:
    h = {"content-type": "application/json"}
    h.update(headers or {})
    return Response(content=body, status_code=status, headers=h)


def _error(
    status: int,
    message: str,
    kind: str,
    code: Optional[str] = None,
    headers: Optional[Dict[str, str]] = None,
) -> Response:
    return _json_response(status, openai_error_body(message, kind, code), headers)


class StarIngress:
    """Raw ASGI-style ingress: `__call__` takes a Starlette Request (see `star_ray.app`)."""

    # (method, path) the app relays; anything else under these prefixes is relayed as well
    # (the child answers 404/405 in its own shape).
    RELAYED_PREFIXES = ("/v1/", "/v2")
    HEALTH = ("/health", "/ready")

    def __init__(
        self,
        model: DeploymentHandle,
        retry_attempts: int = 3,
        retry_backoff_s: float = 0.2,
        retry_after_s: int = 1,
        health_timeout_s: float = 5.0,
    ):
        self.model = model
        self.retry_attempts = max(1, int(retry_attempts))
        self.retry_backoff_s = float(retry_backoff_s)
        self.retry_after_s = int(retry_after_s)
        self.health_timeout_s = float(health_timeout_s)
        self.stats = {"retries": 0, "backpressure": 0, "stream_failures": 0}

    # -- entry -------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        method = request.method.upper()
        query = request.url.query
        headers = {k.lower(): v for k, v in request.headers.items()}

        if path == "/star/v1/jobs" or path.startswith("/star/v1/jobs/"):
            return _error(
                404,
                f"Async jobs are not served by the Ray Serve deployment ({method} {path}): a "
                "job's state lives in one star-run process, and a replica can be replaced at "
                "any time. Use POST /v1/images/generations (with stream: true for progress "
                "events), or star-run serve directly for jobs.",
                "not_found_error",
                "jobs_not_supported",
            )
        if path == "/star/ray/stats":
            return _json_response(200, json.dumps(self.stats).encode())

        body = await request.body()
        if path == GENERATIONS and method == "POST":
            body, seed, stream = _with_seed(body)
            if stream:
                return await self._stream(method, path, query, headers, body, seed)
            return await self._forward(method, path, query, headers, body)
        if path == "/v2" or path.startswith(self.RELAYED_PREFIXES) or path in self.HEALTH:
            if method == "POST" and path.startswith("/v2/") and path.endswith("/infer"):
                body, headers = _infer_with_seed(body, headers)
            timeout = self.health_timeout_s if path in self.HEALTH or "health" in path else None
            return await self._forward(method, path, query, headers, body, timeout)
        return _error(404, f"Invalid URL ({method} {path})", "not_found_error")

    # -- unary -------------------------------------------------------------------------------

    async def _forward(
        self,
        method: str,
        path: str,
        query: str,
        headers: Dict[str, str],
        body: bytes,
        timeout_s: Optional[float] = None,
    ) -> Response:
        last: Optional[BaseException] = None
        for attempt in range(1, self.retry_attempts + 1):
            try:
                call = self.model.forward.remote(method, path, query, headers, body)
                if timeout_s is not None:
                    status, rh, data = await asyncio.wait_for(call, timeout_s)
                else:
                    status, rh, data = await call
            except BackPressureError as e:
                return self._backpressure(e)
            except asyncio.TimeoutError:
                return _error(
                    503,
                    "no model replica answered in time",
                    "service_unavailable_error",
                    None,
                    {"retry-after": str(self.retry_after_s)},
                )
            except Exception as e:  # noqa: BLE001 - sorted below
                if not _is_retryable(e):
                    raise
                last = e
                await self._before_retry(attempt, method, path, e)
                continue
            if status == 503 and attempt < self.retry_attempts and path == GENERATIONS:
                # The child is warming up or draining (a replica being replaced): elsewhere.
                await self._before_retry(attempt, method, path, RuntimeError("child answered 503"))
                continue
            return Response(content=data, status_code=status, headers=rh)
        return self._gave_up(last)

    # -- streamed ----------------------------------------------------------------------------

    async def _stream(
        self,
        method: str,
        path: str,
        query: str,
        headers: Dict[str, str],
        body: bytes,
        seed: Optional[int],
    ) -> Response:
        last: Optional[BaseException] = None
        for attempt in range(1, self.retry_attempts + 1):
            gen = self.model.options(stream=True).forward_stream.remote(
                method, path, query, headers, body
            )
            try:
                head = await gen.__anext__()
                status = int(head["status"])
                rh = dict(head["headers"])
                if not rh.get("content-type", "").startswith("text/event-stream"):
                    data = b"".join([c async for c in gen])
                    if status == 503 and attempt < self.retry_attempts:
                        await self._before_retry(attempt, method, path, RuntimeError("503"))
                        continue
                    return Response(content=data, status_code=status, headers=rh)
                # Nothing is sent to the client before the first event: until then a failure
                # is retried from the beginning.
                try:
                    first = await gen.__anext__()
                except StopAsyncIteration:
                    first = b""
            except BackPressureError as e:
                gen.cancel()
                return self._backpressure(e)
            except Exception as e:  # noqa: BLE001 - sorted below
                if not _is_retryable(e):
                    raise
                last = e
                gen.cancel()
                await self._before_retry(attempt, method, path, e)
                continue
            rh.setdefault("cache-control", "no-cache")
            return StreamingResponse(
                self._relay(gen, first, seed), status_code=status, headers=rh
            )
        return self._gave_up(last)

    async def _relay(self, gen, first: bytes, seed: Optional[int]):
        sent = 0
        try:
            if first:
                yield first
                sent += 1
            async for event in gen:
                yield event
                sent += 1
        except (GeneratorExit, asyncio.CancelledError):
            # The client went away: so does the request, down to the child (which cancels it).
            gen.cancel()
            raise
        except Exception as e:  # noqa: BLE001
            if not _is_retryable(e):
                logger.exception("stream failed")
            self.stats["stream_failures"] += 1
            again = f" (seed {seed}: the same seed draws the same image)" if seed is not None else ""
            yield sse_error_event(
                f"The model replica serving this stream failed after {sent} event(s) had been "
                f"sent, so the stream cannot be resumed; retry the request{again}.",
                "server_error",
                "replica_failed",
            )

    # -- helpers -----------------------------------------------------------------------------

    async def _before_retry(self, attempt: int, method: str, path: str, e: BaseException) -> None:
        if attempt >= self.retry_attempts:
            return
        self.stats["retries"] += 1
        logger.warning(
            "%s %s: attempt %d failed (%s: %s); retrying on another replica",
            method,
            path,
            attempt,
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
        await asyncio.sleep(self.retry_backoff_s * attempt)

    def _backpressure(self, e: BackPressureError) -> Response:
        self.stats["backpressure"] += 1
        return _error(
            429,
            "Every model replica is full and the ingress queue is full "
            f"({e.message}); retry later.",
            "rate_limit_error",
            "rate_limit_exceeded",
            {"retry-after": str(self.retry_after_s)},
        )

    def _gave_up(self, last: Optional[BaseException]) -> Response:
        what = f"{type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}"
        return _error(
            503,
            f"The request failed on {self.retry_attempts} model replicas in a row "
            f"(last: {what}); retry later.",
            "service_unavailable_error",
            "replica_failed",
            {"retry-after": str(self.retry_after_s)},
        )


def _with_seed(body: bytes) -> Tuple[bytes, Optional[int], bool]:
    """The images request with a `seed` (drawn here when absent or null), the seed, and whether
    it asks for a stream. A body that is not a JSON object goes on untouched (the child
    answers it with its own 400/422)."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body, None, False
    if not isinstance(obj, dict):
        return body, None, False
    stream = obj.get("stream") is True
    seed = obj.get("seed")
    if seed is None:
        seed = secrets.randbelow(SEED_LIMIT)
        obj["seed"] = seed
        body = json.dumps(obj).encode()
    return body, seed if isinstance(seed, int) else None, stream


def _infer_with_seed(body: bytes, headers: Dict[str, str]) -> Tuple[bytes, Dict[str, str]]:
    """A KServe v2 infer request with a `seed` parameter when it names none (as an input or a
    parameter): the JSON part is rewritten, binary tensor data after it kept as is."""
    hlen = headers.get("inference-header-content-length")
    try:
        n = int(hlen) if hlen is not None else len(body)
        obj = json.loads(body[:n])
    except (ValueError, UnicodeDecodeError):
        return body, headers
    if not isinstance(obj, dict):
        return body, headers
    inputs = obj.get("inputs")
    params = obj.get("parameters")
    if isinstance(inputs, list) and any(isinstance(i, dict) and i.get("name") == "seed" for i in inputs):
        return body, headers
    if params is not None and not isinstance(params, dict):
        return body, headers
    if isinstance(params, dict) and "seed" in params:
        return body, headers
    obj["parameters"] = dict(params or {}, seed=secrets.randbelow(SEED_LIMIT))
    js = json.dumps(obj).encode()
    out = dict(headers)
    if hlen is not None:
        out["inference-header-content-length"] = str(len(js))
    return js + body[n:], out
