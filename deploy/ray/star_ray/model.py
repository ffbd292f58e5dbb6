"""The model-replica deployment: one `star-run serve` child per replica, requests relayed to it
over loopback HTTP.

The replica adds nothing to a request: the child parses, queues, batches, generates and shapes
every answer (errors included). The replica's health is the child's: `check_health` asks the
child's /ready, and a child that exits ends the replica's process at once, so that Ray marks the
replica dead (callers stop routing to it on the first failed call) and starts a replacement.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import AsyncIterator, Dict, List, Optional, Tuple

import aiohttp
from ray import serve

from .child import StarChild
from .errors import ChildUnavailable

logger = logging.getLogger("ray.serve")

# Request headers the child reads; everything else (hop-by-hop, the proxy's) stays behind.
FORWARD_REQUEST_HEADERS = ("content-type", "accept", "inference-header-content-length")
# Response headers worth passing back (content-length is recomputed by the ingress).
FORWARD_RESPONSE_HEADERS = (
    "content-type",
    "retry-after",
    "allow",
    "inference-header-content-length",
    "cache-control",
)

Head = Dict[str, object]


def _pick(headers, names) -> Dict[str, str]:
    out = {}
    for k, v in headers.items():
        if k.lower() in names:
            out[k.lower()] = v
    return out


class StarModel:
    """A Serve replica wrapping one `star-run serve` child (see `star_ray.app`)."""

    def __init__(
        self,
        argv: List[str],
        env: Optional[Dict[str, str]] = None,
        drain_s: float = 30.0,
        startup_timeout_s: float = 600.0,
        exit_with_child: bool = True,
    ):
        self._argv = list(argv)
        self._exit_with_child = exit_with_child
        self._session: Optional[aiohttp.ClientSession] = None
        self._started = time.time()
        self.child = StarChild(
            self._argv, env=env, drain_s=drain_s, on_unexpected_exit=self._child_exited
        )
        self.child.start(timeout_s=startup_timeout_s)
        logger.info(
            "star-run serve ready: pid %s at %s (%s)",
            self.child.pid,
            self.child.base_url,
            " ".join(self._argv),
        )

    # -- health and lifecycle ----------------------------------------------------------------

    def _child_exited(self, status: int) -> None:
        # Called on the child's watcher thread. Exiting the replica process is the fast way to
        # be replaced: Ray marks a crashed replica unhealthy at once (a failing check_health
        # needs 3 periods in a row), and every caller drops it on its first ActorDiedError, so
        # no request is routed to a replica without a server.
        if not self._exit_with_child:
            return
        logger.error("star-run serve exited (status %s): ending this replica", status)
        for h in logging.getLogger().handlers + logger.handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001
                pass
        sys.stderr.flush()
        os._exit(1)

    async def check_health(self) -> None:
        if not self.child.alive:
            raise RuntimeError(f"star-run serve exited with status {self.child.returncode}")
        status = await asyncio.to_thread(self.child.get_status, "/ready", 5.0)
        if status != 200:
            raise RuntimeError(f"star-run serve /ready answered {status}")

    def __del__(self) -> None:
        # Serve calls this once the replica has no requests left (graceful shutdown): the child
        # drains (SIGTERM) and is killed if it outlives its --drain-s.
        child = getattr(self, "child", None)
        if child is not None:
            status = child.stop()
            logger.info("star-run serve stopped with status %s", status)

    def child_info(self) -> Dict[str, object]:
        """Where this replica's child is (tests kill it by pid; operators read it)."""
        import ray

        ctx = serve.get_replica_context()
        return {
            "pid": self.child.pid,
            "port": self.child.port,
            "url": self.child.base_url,
            "alive": self.child.alive,
            "argv": self._argv,
            "replica_id": str(getattr(ctx.replica_id, "unique_id", ctx.replica_id)),
            "replica_pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "started": self._started,
        }

    # -- relaying ----------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # No total timeout: the child has its own (--request-timeout-s, 504).
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
                connector=aiohttp.TCPConnector(limit=0, force_close=False),
                auto_decompress=False,
            )
        return self._session

    def _unavailable(self, what: str, e: BaseException) -> ChildUnavailable:
        state = "alive" if self.child.alive else f"exited with status {self.child.returncode}"
        return ChildUnavailable(f"star-run serve ({state}) failed {what}: {e!r}")

    def _url(self, path: str, query: str) -> str:
        """The child's URL for a request; a child that is gone is an error the ingress retries."""
        if not self.child.alive:
            raise ChildUnavailable("star-run serve is not running in this replica")
        return self.child.base_url + path + (f"?{query}" if query else "")

    async def forward(
        self,
        method: str,
        path: str,
        query: str,
        headers: Dict[str, str],
        body: bytes,
    ) -> Tuple[int, Dict[str, str], bytes]:
        """One request to the child; its whole answer (status, headers, body)."""
        url = self._url(path, query)
        try:
            async with self._client().request(
                method, url, data=body or None, headers=_pick(headers, FORWARD_REQUEST_HEADERS)
            ) as r:
                data = await r.read()
                return r.status, _pick(r.headers, FORWARD_RESPONSE_HEADERS), data
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as e:
            raise self._unavailable(f"{method} {path}", e) from None

    async def forward_stream(
        self,
        method: str,
        path: str,
        query: str,
        headers: Dict[str, str],
        body: bytes,
    ) -> AsyncIterator[object]:
        """A streamed request: yields the head ({"status", "headers"}) first, then the body.
        An event stream is yielded one whole Server-Sent Event at a time (so that the ingress
        can end a broken stream with a well-formed error event); anything else in one piece."""
        url = self._url(path, query)
        try:
            async with self._client().request(
                method, url, data=body or None, headers=_pick(headers, FORWARD_REQUEST_HEADERS)
            ) as r:
                rh = _pick(r.headers, FORWARD_RESPONSE_HEADERS)
                yield {"status": r.status, "headers": rh}
                if not rh.get("content-type", "").startswith("text/event-stream"):
                    yield await r.read()
                    return
                buf = b""
                async for chunk in r.content.iter_any():
                    buf += chunk
                    while True:
                        cut = buf.find(b"\n\n")
                        if cut < 0:
                            break
                        yield buf[: cut + 2]
                        buf = buf[cut + 2 :]
                if buf:
                    # The child closed the stream inside an event: it did not finish.
                    raise ConnectionError("the event stream ended inside an event")
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as e:
            raise self._unavailable(f"{method} {path} (streamed)", e) from None
