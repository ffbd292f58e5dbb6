"""One `star-run serve` child process: started on a free loopback port, watched, stopped.

No Ray here: the model replica (model.py) owns one `StarChild`. The child is started from a
dedicated thread that lives exactly as long as the child, with the parent-death signal set
(Linux), so that a replica process that dies for any reason (SIGKILL, its node removed) takes
its child with it instead of leaving a server holding memory and a GPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, List, Optional

logger = logging.getLogger("ray.serve")

_LISTENING = re.compile(r"listening on http://([0-9.]+|\[[0-9a-fA-F:]+\]):(\d+)")
_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> Optional[Callable[[], None]]:
    """A preexec_fn that asks the kernel to SIGKILL the child when the thread that started it
    exits (Linux only; elsewhere None). libc is resolved here, before the fork."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sig = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


class ChildFailed(RuntimeError):
    """The child did not start, or did not become ready in time."""


class StarChild:
    """`star-run serve --host 127.0.0.1 --port 0 [flags]`, its port read from the first line of
    its stdout ("listening on http://127.0.0.1:PORT ...")."""

    def __init__(
        self,
        argv: List[str],
        env: Optional[Dict[str, str]] = None,
        drain_s: float = 30.0,
        on_unexpected_exit: Optional[Callable[[int], None]] = None,
    ):
        self.argv = list(argv)
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.drain_s = float(drain_s)
        self.on_unexpected_exit = on_unexpected_exit
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self.host = "127.0.0.1"
        self.returncode: Optional[int] = None
        self._stopping = False
        self._spawned = threading.Event()
        self._listening = threading.Event()
        self._exited = threading.Event()
        self._spawn_error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 600.0) -> None:
        """Start the child and wait until its /ready answers 200 (warm-up done)."""
        self._thread = threading.Thread(target=self._run, name="star-run-child", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        self._spawned.wait(timeout=max(0.0, deadline - time.monotonic()))
        if self._spawn_error is not None:
            raise ChildFailed(f"could not start {self.argv[0]}: {self._spawn_error}")
        while not self._listening.is_set():
            if self._exited.is_set():
                raise ChildFailed(
                    f"star-run serve exited with status {self.returncode} before listening "
                    f"(command: {' '.join(self.argv)}; its stderr is in this replica's log)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ChildFailed(f"star-run serve printed no port within {timeout_s:.0f} s")
            self._listening.wait(timeout=0.05)
        while True:
            if self._exited.is_set():
                raise ChildFailed(
                    f"star-run serve exited with status {self.returncode} during warm-up"
                )
            if self.get_status("/ready", timeout_s=5.0) == 200:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ChildFailed(f"star-run serve was not ready within {timeout_s:.0f} s")
            time.sleep(0.1)

    def _run(self) -> None:
        # This thread starts the child and lives until it exits: the parent-death signal is
        # tied to the thread that forked, so it must not be a pool thread that could go away.
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=None,  # the replica's own stderr: Ray writes it to the worker's log
                env=self.env,
                preexec_fn=_pdeathsig_preexec(),
                close_fds=True,
            )
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._spawn_error = e
            self._spawned.set()
            self._exited.set()
            return
        self._spawned.set()
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if self.port is None:
                m = _LISTENING.search(line)
                if m:
                    self.host = m.group(1).strip("[]")
                    self.port = int(m.group(2))
                    self._listening.set()
            logger.info("star-run: %s", line)
        self.returncode = self.proc.wait()
        self._exited.set()
        if not self._stopping:
            logger.error(
                "star-run serve (pid %s) exited unexpectedly with status %s",
                self.proc.pid,
                self.returncode,
            )
            if self.on_unexpected_exit is not None:
                self.on_unexpected_exit(self.returncode)

    def stop(self) -> Optional[int]:
        """SIGTERM (the child drains: readiness 503, in-flight requests get --drain-s), then
        SIGKILL if it is still there after --drain-s + 2 s. Returns the exit status."""
        self._stopping = True
        p = self.proc
        if p is None or p.poll() is not None:
            self._exited.wait(timeout=1.0)
            return p.returncode if p is not None else None
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=self.drain_s + 2.0)
        except subprocess.TimeoutExpired:
            logger.warning("star-run serve (pid %s) did not exit after draining: killed", p.pid)
            p.kill()
            p.wait(timeout=10.0)
        except ProcessLookupError:
            pass
        self._exited.wait(timeout=2.0)
        return p.returncode

    # -- state -------------------------------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self._exited.is_set() and self.proc.poll() is None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def get_status(self, path: str, timeout_s: float = 5.0) -> Optional[int]:
        """The status of GET path on the child (None when it cannot be reached)."""
        if self.port is None:
            return None
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout_s) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return None
