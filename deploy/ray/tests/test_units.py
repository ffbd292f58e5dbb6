"""star_ray without a cluster: the builder's arguments, the ingress's seed handling, the child
process (started, ready, stopped with its drain; killed with the thread that started it), and
the KubeRay manifest's serve config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
RAY_DIR = REPO / "deploy" / "ray"
sys.path.insert(0, str(RAY_DIR))

import star_ray  # noqa: E402
from star_ray.builder import flag_value  # noqa: E402
from star_ray.ingress import SEED_LIMIT, _infer_with_seed, _with_seed  # noqa: E402

STAR_RUN = Path(os.environ.get("STAR_RUN", REPO / "target" / "release" / "star-run"))


def test_backpressure_follows_the_childs_queue():
    c = star_ray.parse_args(
        {"star_run": "/bin/star-run", "serve_args": "--max-queue 4 --max-batch=3", "num_replicas": "2"}
    )
    o = c.model_options
    # The child's queue plus the one request its worker always has out of it while busy.
    assert o["max_ongoing_requests"] == 5 and o["max_queued_requests"] == 4
    assert o["num_replicas"] == 2 and "autoscaling_config" not in o
    assert c.argv[:6] == ["/bin/star-run", "serve", "--host", "127.0.0.1", "--port", "0"]
    # A CPU replica's ONNX Runtime threads follow its CPUs (default ray_actor_options: 1 CPU).
    assert flag_value(c.argv, "--threads") == "1"
    # Defaults: star-run serve's (--max-queue 16, --max-batch 1, --drain-s 30).
    d = star_ray.parse_args({"star_run": "x"})
    assert d.model_options["max_ongoing_requests"] == 17
    assert d.model_options["graceful_shutdown_timeout_s"] > 30


def test_args_from_the_command_line_and_config_files():
    c = star_ray.parse_args(
        {
            "star_run": "x",
            "model": str(REPO / "assets" / "demo-model"),
            "serve_args": '["--drain-s", "5", "--threads", "2"]',
            "ray_actor_options": '{"num_gpus": 1}',
            "autoscaling_config": '{"min_replicas": 1, "max_replicas": 4}',
            "env": '{"STAR_SERVE_SCALE_DELAY_MS": 5}',
            "max_ongoing_requests": "3",
        }
    )
    assert c.argv[2:4] == ["--model", str(REPO / "assets" / "demo-model")]
    assert c.drain_s == 5 and c.env == {"STAR_SERVE_SCALE_DELAY_MS": "5"}
    assert c.model_options["max_ongoing_requests"] == 3
    # 1 + 16 // 4 = 5, but no more than a replica is sent (3 here).
    assert c.model_options["autoscaling_config"]["target_ongoing_requests"] == 3
    assert c.argv.count("--threads") == 1
    with pytest.raises(ValueError, match="--port"):
        star_ray.parse_args({"star_run": "x", "serve_args": "--port 9"})
    with pytest.raises(ValueError, match="not both"):
        star_ray.parse_args({"star_run": "x", "num_replicas": 2, "autoscaling_config": {"max_replicas": 2}})
    with pytest.raises(ValueError, match="unknown"):
        star_ray.parse_args({"star_run": "x", "replicas": 2})


def test_engine_directories_are_passed_as_engine(tmp_path):
    (tmp_path / "engine.json").write_text("{}")
    c = star_ray.parse_args({"star_run": "x", "model": str(tmp_path)})
    assert c.argv[2:4] == ["--engine", str(tmp_path)]


def test_seeds_are_drawn_once_and_kept():
    body, seed, stream = _with_seed(b'{"prompt": "a", "stream": true, "cfg_scale": 1.5}')
    obj = json.loads(body)
    assert stream and obj["seed"] == seed and 0 <= seed < SEED_LIMIT and obj["cfg_scale"] == 1.5
    assert _with_seed(b'{"prompt": "a", "seed": 7}') == (b'{"prompt": "a", "seed": 7}', 7, False)
    assert json.loads(_with_seed(b'{"prompt": "a", "seed": null}')[0])["seed"] is not None
    assert _with_seed(b"not json") == (b"not json", None, False)
    assert _with_seed(b"[1]") == (b"[1]", None, False)
    # KServe v2: a seed parameter unless the request names one; binary data kept after the JSON.
    js = b'{"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}'
    out, h = _infer_with_seed(js + b"\x00\x01", {"inference-header-content-length": str(len(js))})
    n = int(h["inference-header-content-length"])
    assert json.loads(out[:n])["parameters"]["seed"] >= 0 and out[n:] == b"\x00\x01"
    named = b'{"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [3]}]}'
    assert _infer_with_seed(named, {})[0] == named
    param = b'{"inputs": [], "parameters": {"seed": 3}}'
    assert _infer_with_seed(param, {})[0] == param


needs_binary = pytest.mark.skipif(not STAR_RUN.is_file(), reason=f"{STAR_RUN} is not built")


def _env():
    import glob

    libs = sorted(glob.glob(str(REPO / ".venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*")))
    return {"ORT_DYLIB_PATH": os.environ.get("ORT_DYLIB_PATH", libs[0] if libs else "")}


@needs_binary
def test_child_starts_on_a_free_port_and_drains_on_stop():
    from star_ray.child import StarChild

    exits = []
    c = StarChild(
        [str(STAR_RUN), "serve", "--host", "127.0.0.1", "--port", "0", "--threads", "1", "--drain-s", "2"],
        env=_env(),
        drain_s=2,
        on_unexpected_exit=exits.append,
    )
    c.start(timeout_s=60)
    assert c.port and c.alive and c.get_status("/ready") == 200
    t0 = time.monotonic()
    assert c.stop() == 0  # SIGTERM: the server drains and exits 0
    assert time.monotonic() - t0 < 5 and not c.alive and exits == []


@needs_binary
def test_child_dies_with_the_process_that_started_it(tmp_path):
    # A replica killed with SIGKILL (or its node lost) must not leave its server behind.
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(RAY_DIR)!r})
        from star_ray.child import StarChild
        c = StarChild([{str(STAR_RUN)!r}, "serve", "--port", "0", "--threads", "1"], env={_env()!r})
        c.start(timeout_s=60)
        print(c.pid, flush=True)
        time.sleep(60)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline())
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "star-run serve outlived its replica process"
    finally:
        if p.poll() is None:
            p.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_rayservice_manifest():
    import yaml

    rs = yaml.safe_load((RAY_DIR / "rayservice.yaml").read_text())
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    app = cfg["applications"][0]
    assert app["import_path"] == "star_ray:app"
    args = app["args"]
    assert args["ray_actor_options"]["num_gpus"] == 1
    parsed = star_ray.parse_args(args)
    assert "--threads" not in parsed.argv  # a GPU replica keeps ONNX Runtime's default
    assert parsed.model_options["max_ongoing_requests"] == 17
    drain = parsed.drain_s
    assert parsed.model_options["graceful_shutdown_timeout_s"] > drain
    cluster = rs["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        assert pod["terminationGracePeriodSeconds"] > drain
        c = pod["containers"][0]
        assert c["readinessProbe"]["httpGet"]["path"] and c["livenessProbe"]["httpGet"]["path"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] > parsed.model_options["graceful_shutdown_timeout_s"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
