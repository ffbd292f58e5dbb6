"""`star_ray:app`, the Serve application builder: args (a dict; strings from `serve run ...
key=value`, any JSON type from a Serve config file) in, a bound application out.

The model replica's request limits are the child's own: Ray sends a replica at most
`max_ongoing_requests` = the child's `--max-queue` + 1 requests. The child's queue is a bounded
channel of `--max-queue` requests that its worker takes requests out of (the running batch, and
requests held back for a later batch, are outside it), so while it runs anything it holds at
least `--max-queue` + 1 without refusing. `--max-queue` + `--max-batch` would be more only when
every batch is full: a batch of fewer requests (another `n`, other sampling settings, a quiet
moment) leaves room for fewer, and the child would answer 429 to what Ray sent. What does not fit
waits at the ingress (`max_queued_requests`) and past that is a 429 there.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# star-run serve's own defaults (`star-run serve --help`).
CHILD_DEFAULTS = {"--max-queue": 16, "--max-batch": 1, "--drain-s": 30}
# Flags the replica sets itself.
RESERVED_FLAGS = ("--host", "--port", "--model", "--engine")

KNOWN_ARGS = {
    "model",
    "star_run",
    "serve_args",
    "env",
    "num_replicas",
    "autoscaling_config",
    "ray_actor_options",
    "ingress_actor_options",
    "ingress_replicas",
    "max_ongoing_requests",
    "max_queued_requests",
    "target_ongoing_requests",
    "retry_attempts",
    "retry_backoff_s",
    "health_check_period_s",
    "health_check_timeout_s",
    "graceful_shutdown_timeout_s",
    "max_surge_percent",
    "rolling_update_percentage",
    "startup_timeout_s",
    "exit_with_child",
}


def _dict(v: Any, name: str) -> Optional[Dict[str, Any]]:
    if v is None or v == "":
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError as e:
            raise ValueError(f"{name} must be a JSON object: {e}") from None
    if not isinstance(v, dict):
        raise ValueError(f"{name} must be a mapping, got {type(v).__name__}")
    return dict(v)


def _list(v: Any, name: str) -> List[str]:
    if v is None or v == "":
        return []
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            v = json.loads(s)
        else:
            return shlex.split(s)
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{name} must be a list of strings or one string of flags")
    return [str(x) for x in v]


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def flag_value(argv: List[str], flag: str) -> Optional[str]:
    """The value of `--flag V` or `--flag=V` in argv (the last one wins, as with clap)."""
    found = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(flag + "="):
            found = a[len(flag) + 1 :]
    return found


def has_flag(argv: List[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


@dataclass
class StarRayConfig:
    """The checked form of the builder's args (see README.md for each)."""

    argv: List[str]
    env: Dict[str, str]
    max_queue: int
    max_batch: int
    drain_s: float
    model_options: Dict[str, Any]
    ingress_options: Dict[str, Any]
    ingress_kwargs: Dict[str, Any]
    model_kwargs: Dict[str, Any] = field(default_factory=dict)


def parse_args(args: Optional[Dict[str, Any]]) -> StarRayConfig:
    args = dict(args or {})
    unknown = set(args) - KNOWN_ARGS
    if unknown:
        raise ValueError(
            f"unknown star_ray argument(s): {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(KNOWN_ARGS))})"
        )

    star_run = args.get("star_run") or os.environ.get("STAR_RUN") or shutil.which("star-run")
    if not star_run:
        raise ValueError("star_run: the star-run binary was not given and is not on PATH")
    serve_args = _list(args.get("serve_args"), "serve_args")
    for f in RESERVED_FLAGS:
        if has_flag(serve_args, f):
            raise ValueError(
                f"serve_args: {f} is set by the replica (the model directory is the `model` "
                "argument; each child listens on a free loopback port)"
            )

    def child_int(flag: str) -> int:
        v = flag_value(serve_args, flag)
        return int(v) if v is not None else int(CHILD_DEFAULTS[flag])

    max_queue = child_int("--max-queue")
    max_batch = max(1, child_int("--max-batch"))
    drain_s = float(flag_value(serve_args, "--drain-s") or CHILD_DEFAULTS["--drain-s"])
    if max_queue < 1:
        raise ValueError("--max-queue must be at least 1 behind Ray")

    ray_actor_options = _dict(args.get("ray_actor_options"), "ray_actor_options")
    if ray_actor_options is None:
        ray_actor_options = {"num_cpus": 1}
    # ONNX Runtime's threads follow the replica's CPUs on a CPU replica (its default, one per
    # core of the machine, would oversubscribe a node that runs several replicas).
    if (
        not has_flag(serve_args, "--threads")
        and not ray_actor_options.get("num_gpus")
        and ray_actor_options.get("num_cpus")
    ):
        serve_args += ["--threads", str(max(1, int(math.floor(ray_actor_options["num_cpus"]))))]

    model = args.get("model") or None
    argv = [str(star_run), "serve"]
    if model:
        model = str(model)
        kind = "--engine" if os.path.isfile(os.path.join(model, "engine.json")) else "--model"
        argv += [kind, model]
    argv += ["--host", "127.0.0.1", "--port", "0"] + serve_args

    env = {str(k): str(v) for k, v in (_dict(args.get("env"), "env") or {}).items()}

    max_ongoing = args.get("max_ongoing_requests")
    max_ongoing = int(max_ongoing) if max_ongoing not in (None, "") else max_queue + 1
    max_queued = args.get("max_queued_requests")
    max_queued = int(max_queued) if max_queued not in (None, "") else max_queue

    model_options: Dict[str, Any] = {
        "name": "StarModel",
        "ray_actor_options": ray_actor_options,
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": max_queued,
        # Only used by Serve's own HTTP path; the ingress turns BackPressureError into 429.
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "health_check_period_s": float(args.get("health_check_period_s") or 2.0),
        "health_check_timeout_s": float(args.get("health_check_timeout_s") or 10.0),
        # Serve waits for the replica's requests to finish, then __del__ drains the child.
        "graceful_shutdown_timeout_s": float(
            args.get("graceful_shutdown_timeout_s") or (drain_s + 10.0)
        ),
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    autoscaling = _dict(args.get("autoscaling_config"), "autoscaling_config")
    if autoscaling is not None:
        if args.get("num_replicas") not in (None, "", "auto"):
            raise ValueError("give num_replicas or autoscaling_config, not both")
        target = args.get("target_ongoing_requests")
        if "target_ongoing_requests" not in autoscaling:
            # Default: a replica's running batch plus a quarter of its queue waiting.
            autoscaling["target_ongoing_requests"] = (
                float(target)
                if target not in (None, "")
                else min(max_ongoing, max_batch + max(1, max_queue // 4))
            )
        model_options["autoscaling_config"] = autoscaling
    else:
        model_options["num_replicas"] = int(args.get("num_replicas") or 1)
    for k in ("max_surge_percent",):
        if args.get(k) not in (None, ""):
            model_options[k] = int(args[k])
    if args.get("rolling_update_percentage") not in (None, ""):
        model_options["rolling_update_percentage"] = float(args["rolling_update_percentage"])

    ingress_options: Dict[str, Any] = {
        "name": "StarIngress",
        "num_replicas": int(args.get("ingress_replicas") or 1),
        "ray_actor_options": _dict(args.get("ingress_actor_options"), "ingress_actor_options")
        or {"num_cpus": 0},
        # The ingress only waits on model replicas; its own limit stays out of the way so that
        # backpressure is decided (and answered in OpenAI's shape) at the model handle.
        "max_ongoing_requests": 1000,
    }
    ingress_kwargs = {
        "retry_attempts": int(args.get("retry_attempts") or 3),
        "retry_backoff_s": float(args.get("retry_backoff_s") or 0.2),
    }
    model_kwargs = {
        "argv": argv,
        "env": env,
        "drain_s": drain_s,
        "startup_timeout_s": float(args.get("startup_timeout_s") or 600.0),
        "exit_with_child": _bool(args.get("exit_with_child", True)),
    }
    return StarRayConfig(
        argv=argv,
        env=env,
        max_queue=max_queue,
        max_batch=max_batch,
        drain_s=drain_s,
        model_options=model_options,
        ingress_options=ingress_options,
        ingress_kwargs=ingress_kwargs,
        model_kwargs=model_kwargs,
    )


def app(args: Dict[str, Any]):
    """The Serve application builder (`serve run star_ray:app model=DIR num_replicas=2`)."""
    from ray import serve

    from .ingress import StarIngress
    from .model import StarModel

    cfg = parse_args(args)
    model = serve.deployment(StarModel).options(**cfg.model_options).bind(**cfg.model_kwargs)
    return serve.deployment(StarIngress).options(**cfg.ingress_options).bind(
        model, **cfg.ingress_kwargs
    )
