"""Ray Serve scale-out of `star-run serve`, on a local three-node Ray cluster (loopback only).

A head node (the Serve controller, the HTTP proxy and the ingress) and two worker nodes, each
with one `star_slot` resource, so that the two model replicas (`resources: {star_slot: 1}`) land
on different nodes. The embedded demo model. Under a steady stream of requests (threads; seeds
explicit and absent; n 1 and 2; streamed and not):

- a `star-run serve` child SIGKILLed, then a worker node removed and another added: no failed
  request, and every image with an explicit seed byte-identical to `star-run --prompt P --seed S
  --out x.png` (run once per prompt and seed, cached);
- a rolling update to a copy of the demo model directory: no failed request;
- autoscaling 1 -> 2 under a load step and back to 1 when idle;
- 429 with Retry-After in OpenAI's shape when every replica and the ingress queue are full
  (Ray's backpressure), and a child's own 429 passed through.

Every wait has a deadline; the numbers measured are printed and written to $STAR_RAY_REPORT when
set. Run (under 2 minutes on 2 cores, with test_units.py):

    PYTHONPATH=deploy/ray .venv/bin/python -m pytest deploy/ray/tests -v -s
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import requests

REPO = Path(__file__).resolve().parents[3]
RAY_DIR = REPO / "deploy" / "ray"
sys.path.insert(0, str(RAY_DIR))

import star_ray  # noqa: E402

def _star_run() -> Path:
    """STAR_RUN, else the release build, else the debug build (`cargo test` makes that one)."""
    if os.environ.get("STAR_RUN"):
        return Path(os.environ["STAR_RUN"])
    for build in ("release", "debug"):
        p = REPO / "target" / build / "star-run"
        if p.is_file():
            return p
    return REPO / "target" / "release" / "star-run"


STAR_RUN = _star_run()
APP = "star"
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
SEEDS = [11, 12, 13, 14]  # n=2 requests also use seed + 1
REPORT: Dict[str, object] = {}

# A missing binary fails the run (collection error), it does not skip it.
if not STAR_RUN.is_file():
    raise RuntimeError(f"{STAR_RUN} is not built: cargo build -p star-runtime, or set STAR_RUN")


def ort_dylib() -> Optional[str]:
    if os.environ.get("ORT_DYLIB_PATH"):
        return os.environ["ORT_DYLIB_PATH"]
    found = sorted(
        glob.glob(str(REPO / ".venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*"))
    )
    return found[0] if found else None


def child_env(**extra: str) -> Dict[str, str]:
    env = {}
    if ort_dylib():
        env["ORT_DYLIB_PATH"] = ort_dylib()
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, cond, timeout_s: float, every_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


# -- the CLI's images, the reference ------------------------------------------------------------


class CliImages:
    """`star-run --prompt P --seed S --out x.png`, cached on disk by binary, prompt and seed."""

    def __init__(self):
        st = STAR_RUN.stat()
        key = hashlib.sha256(f"{STAR_RUN}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        self.dir = Path(os.environ.get("STAR_RAY_CLI_CACHE", tempfile.gettempdir())) / (
            "star-ray-cli-" + key
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mem: Dict[tuple, bytes] = {}

    def get(self, prompt: str, seed: int) -> bytes:
        k = (prompt, seed)
        if k not in self.mem:
            name = hashlib.sha256(f"{prompt}\0{seed}".encode()).hexdigest()[:24] + ".png"
            path = self.dir / name
            if not path.is_file():
                tmp = path.with_suffix(f".{os.getpid()}.tmp.png")
                subprocess.run(
                    [str(STAR_RUN), "--prompt", prompt, "--seed", str(seed), "--out", str(tmp)],
                    cwd=REPO,
                    env={**os.environ, **child_env()},
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                os.replace(tmp, path)
            self.mem[k] = path.read_bytes()
        return self.mem[k]


# -- load ---------------------------------------------------------------------------------------


def parse_sse(text: str) -> List[tuple]:
    out = []
    for block in text.split("\n\n"):
        ev, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if ev or data:
            out.append((ev, json.loads("\n".join(data)) if data else None))
    return out


class Load:
    """Threads sending a steady stream of images requests until stopped (or their deadline).
    Each request is checked: 200, PNG images, and for an explicit seed the CLI's bytes."""

    def __init__(self, base: str, cli: CliImages, threads: int = 3, think_s: float = 0.05,
                 deadline_s: float = 240.0, kinds=None, timeout_s: float = 90.0):
        self.base = base
        self.cli = cli
        self.n_threads = threads
        self.think_s = think_s
        self.deadline = time.monotonic() + deadline_s
        self.kinds = kinds or ["seed", "noseed", "seed_n2", "stream_seed", "seed", "stream_noseed"]
        self.timeout_s = timeout_s
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.sent = Counter()
        self.ok = Counter()
        self.failures: List[str] = []
        self.compared = 0
        self.threads: List[threading.Thread] = []

    def start(self) -> "Load":
        for t in range(self.n_threads):
            th = threading.Thread(target=self._loop, args=(t,), daemon=True)
            th.start()
            self.threads.append(th)
        return self

    def stop(self) -> "Load":
        self.stop_ev.set()
        for th in self.threads:
            th.join(timeout=self.timeout_s + 5)
        assert not any(th.is_alive() for th in self.threads), "a load thread did not stop"
        return self

    def total(self) -> int:
        return sum(self.sent.values())

    def _fail(self, msg: str) -> None:
        with self.lock:
            self.failures.append(msg)

    def _loop(self, t: int) -> None:
        rng = random.Random(1000 + t)
        s = requests.Session()
        i = t
        while not self.stop_ev.is_set() and time.monotonic() < self.deadline:
            kind = self.kinds[i % len(self.kinds)]
            i += 1
            prompt = rng.choice(PROMPTS)
            seed = rng.choice(SEEDS)
            body: Dict[str, object] = {"prompt": prompt}
            if "noseed" not in kind:
                body["seed"] = seed
            if kind == "seed_n2":
                body["n"] = 2
            if kind.startswith("stream"):
                body["stream"] = True
            with self.lock:
                self.sent[kind] += 1
            try:
                r = s.post(self.base + "/v1/images/generations", json=body, timeout=self.timeout_s)
                self._check(kind, body, r)
            except Exception as e:  # noqa: BLE001
                self._fail(f"{kind}: {type(e).__name__}: {e}")
            self.stop_ev.wait(self.think_s)

    def _check(self, kind: str, body: Dict[str, object], r: requests.Response) -> None:
        if r.status_code != 200:
            self._fail(f"{kind}: HTTP {r.status_code}: {r.text[:300]}")
            return
        if body.get("stream"):
            events = parse_sse(r.text)
            done = [d for e, d in events if e == "image_generation.completed"]
            errs = [d for e, d in events if e == "error"]
            if errs or len(done) != 1:
                self._fail(f"{kind}: stream events {[e for e, _ in events]}: {errs}")
                return
            images = [base64.b64decode(done[0]["b64_json"])]
        else:
            data = r.json()["data"]
            images = [base64.b64decode(d["b64_json"]) for d in data]
            if len(images) != body.get("n", 1):
                self._fail(f"{kind}: {len(images)} images for n={body.get('n', 1)}")
                return
            if "seed" in body and [d.get("seed") for d in data] != [
                body["seed"] + j for j in range(len(data))
            ]:
                self._fail(f"{kind}: seeds {[d.get('seed') for d in data]} for {body['seed']}")
                return
            if "seed" not in body and not all(isinstance(d.get("seed"), int) for d in data):
                self._fail(f"{kind}: no seed returned")
                return
        for j, png in enumerate(images):
            if not png.startswith(b"\x89PNG"):
                self._fail(f"{kind}: not a PNG")
                return
            if "seed" in body:
                want = self.cli.get(str(body["prompt"]), int(body["seed"]) + j)
                if png != want:
                    self._fail(f"{kind}: image {j} of seed {body['seed']} differs from the CLI's")
                    return
                with self.lock:
                    self.compared += 1
        with self.lock:
            self.ok[kind] += 1

    def summary(self) -> Dict[str, object]:
        return {
            "sent": self.total(),
            "ok": sum(self.ok.values()),
            "failed": len(self.failures),
            "images_compared_with_cli": self.compared,
            "by_kind": dict(self.sent),
        }


# -- the cluster --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli() -> CliImages:
    c = CliImages()
    for p in PROMPTS:
        for s in SEEDS + [max(SEEDS) + 1]:
            c.get(p, s)
    return c


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # Workers import star_ray; the child needs ONNX Runtime's library.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(RAY_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    if ort_dylib():
        os.environ["ORT_DYLIB_PATH"] = ort_dylib()
    # Loopback only: every node's address is 127.0.0.1.
    small = {
        "object_store_memory": 100 * 1024 * 1024,
        "include_dashboard": False,
        "node_ip_address": "127.0.0.1",
    }
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            **small,
            # A killed node is noticed in about 2 s instead of Ray's default 15 s or so.
            "_system_config": {
                "health_check_initial_delay_ms": 1000,
                "health_check_period_ms": 500,
                "health_check_timeout_ms": 1000,
                "health_check_failure_threshold": 3,
            },
        },
    )
    workers = [c.add_node(num_cpus=1, resources={"star_slot": 1}, **small) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(
        address=c.address, _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    state = {
        "cluster": c,
        "workers": workers,
        "base": f"http://127.0.0.1:{port}",
        "small": small,
        "pids": set(),
    }
    yield state
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        c.shutdown()
    # Every star-run child the test saw is gone (drained on shutdown, or killed with its replica).
    left = wait_until(
        "every star-run child to exit",
        lambda: [p for p in state["pids"] if _is_star_run(p)] == [] or None,
        30,
        0.5,
    )
    assert left
    out = os.environ.get("STAR_RAY_REPORT")
    if out:
        Path(out).write_text(json.dumps(REPORT, indent=2))
    print("\nSTAR_RAY_REPORT " + json.dumps(REPORT))


def _is_star_run(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        return b"star-run" in cmd and not zombie
    except OSError:
        return False


def deploy(cluster, **args):
    from ray import serve

    base = {
        "star_run": str(STAR_RUN),
        "env": child_env(),
        "ray_actor_options": {"num_cpus": 1, "resources": {"star_slot": 1}},
        # The ingress on the head node, with the HTTP proxy: a worker node's loss takes model
        # replicas (whose requests the ingress retries), never the ingress itself.
        "ingress_actor_options": {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
        "health_check_period_s": 1,
    }
    base.update(args)
    t0 = time.monotonic()
    serve.run(star_ray.app(base), name=APP, route_prefix="/")
    return time.monotonic() - t0


def model_handle():
    from ray import serve

    return serve.get_deployment_handle("StarModel", app_name=APP)


def replica_states() -> Dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "StarModel" not in app.deployments:
        return {}
    return {str(getattr(k, "value", k)): v for k, v in app.deployments["StarModel"].replica_states.items()}


def running() -> int:
    return replica_states().get("RUNNING", 0)


def child_infos(cluster, want: int, timeout_s: float = 30.0) -> Dict[str, dict]:
    """The child of each running replica (asked through the handle until `want` answer)."""
    h = model_handle()
    seen: Dict[str, dict] = {}

    def ask():
        for r in [h.child_info.remote() for _ in range(6)]:
            try:
                info = r.result(timeout_s=10)
            except Exception:  # noqa: BLE001 - a replica going away; ask again
                continue
            seen[info["replica_id"]] = info
            cluster["pids"].add(info["pid"])
        alive = {k: v for k, v in seen.items() if _is_star_run(v["pid"])}
        return alive if len(alive) >= want else None

    return wait_until(f"{want} replicas' child info", ask, timeout_s, 0.2)


def queue_size(info: dict) -> int:
    """star_queue_size of a replica's child (requests waiting behind the running one)."""
    try:
        text = requests.get(info["url"] + "/metrics", timeout=5).text
    except requests.RequestException:
        return -1
    for line in text.splitlines():
        if line.startswith("star_queue_size "):
            return int(float(line.split()[1]))
    return -1


def wait_busy(info: dict, timeout_s: float = 20.0) -> bool:
    """Until the child has a request running and one waiting (so that the failure that follows
    hits requests in flight); False if that did not happen in time."""
    try:
        wait_until("a busy child", lambda: queue_size(info) >= 1 or None, timeout_s, 0.02)
        return True
    except AssertionError:
        return False


def ingress_stats(base: str) -> Dict[str, int]:
    return requests.get(base + "/star/ray/stats", timeout=10).json()


# -- tests --------------------------------------------------------------------------------------


def test_routes(cluster, cli):
    # Each of the demo's 4 scales sleeps 20 ms: requests stay in flight long enough to be hit.
    took = deploy(cluster, num_replicas=2, env=child_env(STAR_SERVE_SCALE_DELAY_MS="20"))
    REPORT["deploy_2_replicas_s"] = round(took, 1)
    infos = child_infos(cluster, 2)
    assert len({i["node_id"] for i in infos.values()}) == 2, "the replicas share a node"
    base = cluster["base"]
    assert requests.get(base + "/ready", timeout=10).status_code == 200
    assert requests.get(base + "/health", timeout=10).status_code == 200
    assert requests.get(base + "/v2/health/ready", timeout=10).status_code == 200
    models = requests.get(base + "/v1/models", timeout=10).json()
    mid = models["data"][0]["id"]
    assert requests.get(f"{base}/v1/models/{mid}", timeout=10).json()["id"] == mid
    r = requests.get(base + "/v1/models/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # Jobs are not served by the Ray app: a clear OpenAI-shaped 404.
    r = requests.post(base + "/star/v1/jobs", json={"prompt": "x"}, timeout=10)
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "jobs_not_supported"
    assert "Ray Serve" in err["message"] and set(err) == {"message", "type", "param", "code"}
    r = requests.get(base + "/nowhere", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /nowhere)"
    # The child's own errors pass through in its shape.
    r = requests.post(base + "/v1/images/generations", json={"prompt": "x", "n": 99}, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["param"] == "n"
    # The official SDK against the Ray app: the same bytes as the CLI.
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    res = client.images.generate(prompt=PROMPTS[0], extra_body={"seed": 12})
    assert base64.b64decode(res.data[0].b64_json) == cli.get(PROMPTS[0], 12)
    # KServe v2 infer without a seed gets one from the ingress (so a retry is the same image).
    r = requests.post(
        f"{base}/v2/models/{mid}/infer",
        json={"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [PROMPTS[0]]}]},
        timeout=30,
    )
    assert r.status_code == 200, r.text[:300]
    assert r.json()["outputs"][0]["shape"] == [64, 64, 3]


def test_child_killed_then_node_replaced(cluster, cli):
    base = cluster["base"]
    infos = child_infos(cluster, 2)
    load = Load(base, cli, threads=4, think_s=0.02).start()
    try:
        time.sleep(3)
        # (a) SIGKILL one star-run child while it has a request running and one waiting.
        victim = next(iter(infos.values()))
        stats0 = ingress_stats(base)
        busy_a = wait_busy(victim)
        t0 = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced():
            if running() < 2:
                return None
            now = child_infos(cluster, 2, 20)
            return now if victim["replica_id"] not in now else None

        after = wait_until("the replica with the killed child to be replaced", replaced, 90)
        replace_s = time.monotonic() - t0
        time.sleep(2)
        stats1 = ingress_stats(base)
        sent_a = load.total()

        # (b) Remove the worker node of a replica (its processes SIGKILLed) while that replica
        # is busy, then add a node back.
        victim_info = next(iter(after.values()))
        node = next(w for w in cluster["workers"] if w.node_id == victim_info["node_id"])
        busy_b = wait_busy(victim_info)
        t1 = time.monotonic()
        cluster["cluster"].remove_node(node, allow_graceful=False)
        cluster["workers"].remove(node)
        wait_until("one replica to be left", lambda: running() == 1 or None, 60)
        lost_s = time.monotonic() - t1
        time.sleep(2)  # one replica serves everything meanwhile
        t2 = time.monotonic()
        cluster["workers"].append(
            cluster["cluster"].add_node(num_cpus=1, resources={"star_slot": 1}, **cluster["small"])
        )
        final = wait_until(
            "two replicas again", lambda: (running() == 2 and child_infos(cluster, 2, 20)) or None, 120
        )
        node_back_s = time.monotonic() - t2
        assert len({i["node_id"] for i in final.values()}) == 2
        time.sleep(3)
    finally:
        load.stop()
    stats2 = ingress_stats(base)
    REPORT["child_kill_and_node_loss"] = {
        **load.summary(),
        "requests_before_node_loss": sent_a,
        "child_busy_when_killed": busy_a,
        "retries_after_child_kill": stats1["retries"] - stats0["retries"],
        "child_killed_to_replica_replaced_s": round(replace_s, 1),
        "node_busy_when_removed": busy_b,
        "retries_after_node_loss": stats2["retries"] - stats1["retries"],
        "node_removed_to_replica_gone_s": round(lost_s, 1),
        "node_added_to_two_replicas_s": round(node_back_s, 1),
    }
    print("\n", json.dumps(REPORT["child_kill_and_node_loss"]))
    assert load.failures == [], load.failures[:10]
    assert load.compared > 0 and sum(load.ok.values()) == load.total()
    # Requests were in flight on the failed replica each time, and were run again elsewhere.
    assert busy_a and stats1["retries"] > stats0["retries"]
    assert busy_b and stats2["retries"] > stats1["retries"]


def test_rolling_update(cluster, cli, tmp_path):
    from ray import serve  # noqa: F401

    base = cluster["base"]
    before = child_infos(cluster, 2)
    copy = tmp_path / "demo-model-copy"
    shutil.copytree(REPO / "assets" / "demo-model", copy)
    samples: List[Dict[str, int]] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            samples.append(replica_states())
            stop.wait(0.25)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    load = Load(base, cli).start()
    try:
        time.sleep(2)
        took = deploy(
            cluster, num_replicas=2, model=str(copy), env=child_env(STAR_SERVE_SCALE_DELAY_MS="20")
        )
        after = child_infos(cluster, 2)
        time.sleep(2)
    finally:
        load.stop()
        stop.set()
        w.join(5)
    assert not set(before) & set(after), "a replica was not replaced"
    assert all(str(copy) in i["argv"] for i in after.values())
    min_running = min(s.get("RUNNING", 0) for s in samples)
    REPORT["rolling_update"] = {
        **load.summary(),
        "update_s": round(took, 1),
        "fewest_running_replicas": min_running,
    }
    print("\n", json.dumps(REPORT["rolling_update"]))
    assert load.failures == [], load.failures[:10]
    assert min_running >= 1


def test_autoscaling_up_and_down(cluster, cli):
    from ray import serve

    serve.delete(APP)
    deploy(
        cluster,
        autoscaling_config={
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 4,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
        # Each of the 4 scales sleeps 40 ms: requests are slow enough to pile up.
        env=child_env(STAR_SERVE_SCALE_DELAY_MS="40"),
    )
    assert running() == 1
    load = Load(cluster["base"], cli, threads=4, think_s=0.0, kinds=["seed", "noseed"]).start()
    t0 = time.monotonic()
    try:
        wait_until("a second replica under load", lambda: running() == 2 or None, 90)
        up_s = time.monotonic() - t0
        time.sleep(2)
    finally:
        load.stop()
    t1 = time.monotonic()
    wait_until(
        "one replica when idle",
        lambda: (replica_states().get("RUNNING") == 1 and sum(replica_states().values()) == 1) or None,
        90,
    )
    down_s = time.monotonic() - t1
    REPORT["autoscaling"] = {**load.summary(), "scale_up_s": round(up_s, 1), "scale_down_s": round(down_s, 1)}
    print("\n", json.dumps(REPORT["autoscaling"]))
    assert load.failures == [], load.failures[:10]


def metric_sum(info: dict, name: str) -> float:
    """The sum of a child's metric over its labels (-1 when the child cannot be reached)."""
    try:
        text = requests.get(info["url"] + "/metrics", timeout=5).text
    except requests.RequestException:
        return -1
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_streams_restart_or_end_with_an_error_event(cluster, cli):
    from ray import serve

    serve.delete(APP)
    # One replica; each of the 4 scales sleeps 250 ms (about 1 s a request).
    deploy(cluster, num_replicas=1, env=child_env(STAR_SERVE_SCALE_DELAY_MS="250"))
    base = cluster["base"]
    url = base + "/v1/images/generations"

    # (1) The child dies before the stream's first event: it starts again on the replacement
    # replica, and the client sees one stream with the CLI's image.
    info = next(iter(child_infos(cluster, 1).values()))
    scales = metric_sum(info, "star_scale_step_duration_seconds_count")
    res: Dict[str, object] = {}

    def send():
        try:
            res["r"] = requests.post(
                url, json={"prompt": PROMPTS[1], "seed": 13, "stream": True}, timeout=90
            )
        except Exception as e:  # noqa: BLE001
            res["e"] = e

    th = threading.Thread(target=send)
    th.start()
    wait_until(
        "the stream's first scale",
        lambda: metric_sum(info, "star_scale_step_duration_seconds_count") > scales or None,
        30,
        0.02,
    )
    t0 = time.monotonic()
    os.kill(info["pid"], signal.SIGKILL)
    th.join(100)
    restarted_s = time.monotonic() - t0
    assert "r" in res, res.get("e")
    r = res["r"]
    assert r.status_code == 200, r.text[:300]
    events = parse_sse(r.text)
    assert [e for e, _ in events] == ["image_generation.completed"], events
    assert base64.b64decode(events[0][1]["b64_json"]) == cli.get(PROMPTS[1], 13)

    # (2) The child dies after a preview was sent: the stream ends with an error event.
    info = next(iter(child_infos(cluster, 1).values()))
    seen: List[tuple] = []
    with requests.post(
        url, json={"prompt": PROMPTS[1], "stream": True, "partial_images": 2}, stream=True, timeout=90
    ) as r:
        assert r.status_code == 200
        ev = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                seen.append((ev, json.loads(line[5:])))
                if ev == "image_generation.partial_image" and len(seen) == 1:
                    os.kill(info["pid"], signal.SIGKILL)
    kinds = [e for e, _ in seen]
    assert kinds[0] == "image_generation.partial_image" and kinds[-1] == "error", kinds
    assert "image_generation.completed" not in kinds
    err = seen[-1][1]["error"]
    assert err["code"] == "replica_failed" and "seed" in err["message"], err

    # (3) A client that goes away after a preview cancels the request in the child.
    info = next(iter(child_infos(cluster, 1).values()))
    cancelled = metric_sum(info, "star_requests_cancelled_total")
    with requests.post(
        url, json={"prompt": PROMPTS[1], "stream": True, "partial_images": 2}, stream=True, timeout=90
    ) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: image_generation.partial_image"):
                break
    t0 = time.monotonic()
    wait_until(
        "the child to cancel the abandoned stream",
        lambda: metric_sum(info, "star_requests_cancelled_total") > cancelled or None,
        20,
        0.05,
    )
    REPORT["streams"] = {
        "restarted_stream_s": round(restarted_s, 1),
        "broken_stream_events": kinds,
        "client_gone_to_child_cancel_s": round(time.monotonic() - t0, 2),
    }
    print("\n", json.dumps(REPORT["streams"]))


def _burst(base: str, n: int, gap_s: float = 0.12) -> List[requests.Response]:
    """n requests, started gap_s apart (all within a request's time)."""
    out: List[Optional[requests.Response]] = [None] * n
    go = threading.Barrier(n)

    def one(i):
        go.wait(10)
        time.sleep(i * gap_s)
        out[i] = requests.post(
            base + "/v1/images/generations",
            json={"prompt": PROMPTS[0], "seed": SEEDS[i % len(SEEDS)]},
            timeout=60,
        )

    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(70)
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


def _check_burst(rs: List[requests.Response], cli: CliImages, message: str) -> Counter:
    statuses = Counter(r.status_code for r in rs)
    assert set(statuses) <= {200, 429}, statuses
    for i, r in enumerate(rs):
        if r.status_code == 429:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
            assert message in err["message"], err["message"]
            assert int(r.headers["retry-after"]) >= 1
        else:
            png = base64.b64decode(r.json()["data"][0]["b64_json"])
            assert png == cli.get(PROMPTS[0], SEEDS[i % len(SEEDS)])
    return statuses


def test_backpressure_429(cluster, cli):
    from ray import serve

    serve.delete(APP)
    # ~1.3 s a request: the first still runs when the eighth arrives (0.84 s later), with room
    # for a slow machine (requests still being assigned count as queued in Ray).
    slow = child_env(STAR_SERVE_SCALE_DELAY_MS="320")
    # Ray admits what the child holds (1 queued + 1 running) and 1 more waits at the ingress.
    deploy(cluster, num_replicas=1, serve_args=["--max-queue", "1"], max_queued_requests=1, env=slow)
    ray_side = _check_burst(_burst(cluster["base"], 8), cli, "Every model replica is full")
    # Ray told to send more than the child admits: the child's own 429 passes through.
    deploy(
        cluster,
        num_replicas=1,
        serve_args=["--max-queue", "1"],
        max_ongoing_requests=8,
        max_queued_requests=-1,
        env=slow,
    )
    child_side = _check_burst(_burst(cluster["base"], 8), cli, "the queue is full")
    REPORT["backpressure"] = {"ray_backpressure": dict(ray_side), "child_429": dict(child_side)}
    print("\n", json.dumps(REPORT["backpressure"]))
    assert ray_side[429] >= 3 and ray_side[200] >= 2, ray_side
    assert child_side[429] >= 3 and child_side[200] >= 1, child_side
