#!/usr/bin/env python3
"""Evaluates the KEDA trigger's Prometheus query with a real Prometheus scraping star-run serve.

  python3 deploy/checks/keda_query.py          (needs `prometheus` on PATH: apt-get install prometheus)

What it does, on loopback only, within about a minute:
  1. reads the trigger (query, threshold) from deploy/kserve/keda-scaledobject.yaml and the
     container args and name from deploy/kserve/inferenceservice.yaml;
  2. starts two replicas of `star-run serve` with the manifest's args (each scale slowed by
     STAR_SERVE_SCALE_DELAY_MS so that requests wait), and a Prometheus that scrapes both; the
     scrape config gives each target the labels Kubernetes service discovery would
     (__meta_kubernetes_service_name -> service = "<InferenceService>-predictor", the Service
     KServe creates in RawDeployment mode; namespace; pod), so the query's selector is tested
     against the name the cluster would have, not copied from the query;
  3. idle: the query returns exactly one sample, 0;
  4. load (more requests to one replica than to the other, more than `threshold` waiting per
     replica on average): the query returns one sample, equal to its aggregation (sum, avg, ...)
     of the replicas' own star_queue_size (read from their /metrics while they held still) and
     above the threshold; and the scaling decision KEDA's HPA takes on that value (its formula
     for the trigger's metricType, default AverageValue: desired = ceil(value / threshold);
     Value: ceil(replicas * value / threshold); tolerance 0.1) adds replicas;
  5. once every request has been answered: one sample, back to 0, and the decision is
     minReplicaCount.
--scaledobject / --inferenceservice check other copies of the manifests.
Exit status 0 on success, 1 on a failed check or a setup problem (each says which).
Environment: STAR_RUN (the binary; default target/release/star-run, else target/debug/star-run),
PROMETHEUS (default: prometheus on PATH).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"
SCALE_DELAY_MS = 400  # 4 scales: each request runs >= 1.6 s, so the queue holds still that long
SCRAPE_INTERVAL_S = 0.5
OVERALL_S = 100  # hard ceiling for the whole check


class CheckFailed(Exception):
    pass


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {msg}", flush=True)


T0 = time.monotonic()


def deadline_left() -> float:
    return OVERALL_S - (time.monotonic() - T0)


# ---------------------------------------------------------------- manifests

def load_yaml(path: Path):
    try:
        import yaml  # PyYAML: in the project venv

        return yaml.safe_load(path.read_text())
    except ImportError:
        raise CheckFailed(f"PyYAML is needed to read {path}: run with the project's .venv/bin/python")


SCALED_OBJECT = KSERVE / "keda-scaledobject.yaml"
INFERENCE_SERVICE = KSERVE / "inferenceservice.yaml"


class Trigger:
    def __init__(self, so: dict):
        triggers = [t for t in so["spec"]["triggers"] if t.get("type") == "prometheus"]
        if len(triggers) != 1:
            raise CheckFailed(f"expected one prometheus trigger, found {len(triggers)}")
        t = triggers[0]
        self.query = t["metadata"]["query"]
        self.threshold = float(t["metadata"]["threshold"])
        # KEDA's default for a trigger's metric: AverageValue (the HPA divides by the replicas).
        self.metric_type = t.get("metricType", "AverageValue")
        self.min = int(so["spec"].get("minReplicaCount", 0))
        self.max = int(so["spec"].get("maxReplicaCount", 100))
        m = re.match(r"\s*(sum|avg|max|min|count)\s*\(", self.query)
        self.aggregation = m.group(1) if m else None

    def expected(self, per_replica: list[float]) -> float:
        """What the query must give for these replicas' own star_queue_size values."""
        return {
            "sum": sum, "max": max, "min": min, "count": len,
            "avg": lambda xs: sum(xs) / len(xs),
        }[self.aggregation](per_replica)

    def desired_replicas(self, value: float, current: int) -> tuple[int, str]:
        """The HPA's decision on KEDA's external metric (tolerance 0.1), clamped to the bounds."""
        if self.metric_type == "AverageValue":
            seen = value / current  # the HPA compares value / replicas with the threshold
            ratio = seen / self.threshold
            how = f"AverageValue: the HPA sees {value:g}/{current} = {seen:g} per replica against {self.threshold:g}"
        elif self.metric_type == "Value":
            ratio = value / self.threshold
            how = f"Value: the HPA compares {value:g} with {self.threshold:g}"
        else:
            raise CheckFailed(f"metricType {self.metric_type!r}: not modelled here")
        desired = current if abs(ratio - 1) <= 0.1 else math.ceil(ratio * current)
        return max(self.min, min(self.max, desired)), how


def read_manifests():
    so = load_yaml(SCALED_OBJECT)
    isvc = load_yaml(INFERENCE_SERVICE)
    trigger = Trigger(so)
    if trigger.aggregation is None:
        raise CheckFailed(f"the query {trigger.query!r} is not one of sum/avg/max/min/count(...): "
                          "its exact value cannot be checked against the replicas' own metrics")
    name = isvc["metadata"]["name"]
    container = isvc["spec"]["predictor"]["containers"][0]
    args = [str(a) for a in container.get("args", [])]
    return trigger, f"{name}-predictor", args


# ---------------------------------------------------------------- processes and HTTP

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def wait_for(what: str, probe, timeout: float, interval: float = 0.2):
    """Calls probe() until it returns a true value, or fails after `timeout` s."""
    end = time.monotonic() + min(timeout, max(deadline_left(), 1))
    last = None
    while time.monotonic() < end:
        try:
            v = probe()
            if v:
                return v
            last = v
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last = e
        time.sleep(interval)
    raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


ALL_PROCS: list[subprocess.Popen] = []  # for the last-resort timer


def kill_everything_and_exit() -> None:
    print("FAIL: the check overran its hard limit: processes killed", flush=True)
    for p in ALL_PROCS:
        if p.poll() is None:
            p.kill()
    os._exit(1)


class Procs:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.items: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], env=None) -> tuple[subprocess.Popen, Path]:
        out = self.tmp / f"{name}.log"
        f = open(out, "wb")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=ROOT, start_new_session=True)
        f.close()
        ALL_PROCS.append(p)
        self.items.append((name, p, out))
        return p, out

    def check_alive(self):
        for name, p, out in self.items:
            if p.poll() is not None:
                raise CheckFailed(f"{name} exited with {p.returncode}:\n{tail(out)}")

    def stop_all(self):
        for _, p, _ in self.items:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        for name, p, _ in self.items:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop on SIGTERM: killed")
                p.kill()
                p.wait(timeout=5)

    def dump_logs(self):
        for name, _, out in self.items:
            print(f"--- {name} log (last lines) ---\n{tail(out)}", file=sys.stderr)


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def star_run_binary() -> Path:
    if os.environ.get("STAR_RUN"):
        return Path(os.environ["STAR_RUN"])
    for b in (ROOT / "target/release/star-run", ROOT / "target/debug/star-run"):
        if b.exists():
            return b
    raise CheckFailed("no star-run binary: build it (cargo build --release -p star-runtime) or set STAR_RUN")


def start_replica(procs: Procs, binary: Path, idx: int, args: list[str]) -> int:
    # The manifest's args, with a loopback listener on a free port instead of the image's.
    argv = [str(binary), "serve", *args, "--host", "127.0.0.1", "--port", "0", "--threads", "1"]
    env = dict(os.environ, STAR_SERVE_SCALE_DELAY_MS=str(SCALE_DELAY_MS))
    _, out = procs.start(f"star-run-{idx}", argv, env)

    def port():
        procs.check_alive()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", out.read_text(errors="replace"))
        return int(m.group(1)) if m else None

    return wait_for(f"star-run replica {idx} to listen", port, 30)


def queue_size(port: int) -> float:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        raise CheckFailed(f"/metrics of :{port} answered {status}")
    m = re.search(r"^star_queue_size (\S+)$", body, re.M)
    if not m:
        raise CheckFailed(f"/metrics of :{port} has no star_queue_size")
    return float(m.group(1))


def prom_query(prom: int, query: str) -> list:
    url = f"http://127.0.0.1:{prom}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, body = http_get(url)
    data = json.loads(body)
    if status != 200 or data.get("status") != "success":
        raise CheckFailed(f"Prometheus rejected the query {query!r}: {status} {body[:300]}")
    if data["data"]["resultType"] != "vector":
        raise CheckFailed(f"the query gives a {data['data']['resultType']}, KEDA needs an instant vector")
    return data["data"]["result"]


def one_sample(result: list, query: str) -> float:
    # KEDA's prometheus scaler refuses a result of more than one element, and an empty result
    # (no series matched) is an error unless ignoreNullValues: both fail here.
    if len(result) != 1:
        raise CheckFailed(f"{query!r} returned {len(result)} samples, KEDA needs exactly one: {result}")
    return float(result[0]["value"][1])


# ---------------------------------------------------------------- the check

def run(tmp: Path) -> None:
    trigger, service, args = read_manifests()
    query, threshold = trigger.query, trigger.threshold
    problems: list[str] = []
    prometheus = os.environ.get("PROMETHEUS") or shutil.which("prometheus")
    if not prometheus:
        raise CheckFailed("prometheus is not installed (Debian: apt-get install prometheus)")
    version = subprocess.run([prometheus, "--version"], capture_output=True, text=True, timeout=10)
    log(f"{(version.stdout or version.stderr).splitlines()[0]}")
    log(f"query {query!r}, threshold {threshold:g}, metricType {trigger.metric_type}, Service {service!r}, args {args}")
    binary = star_run_binary()
    procs = Procs(tmp)
    try:
        ports = [start_replica(procs, binary, i, args) for i in range(2)]
        log(f"star-run replicas on :{ports[0]} and :{ports[1]} ({binary.relative_to(ROOT) if binary.is_relative_to(ROOT) else binary})")

        prom = free_port()
        targets = "\n".join(
            f"""      - targets: ["127.0.0.1:{p}"]
        labels:
          __meta_kubernetes_namespace: default
          __meta_kubernetes_service_name: {service}
          __meta_kubernetes_pod_name: {service}-{i}"""
            for i, p in enumerate(ports)
        )
        (tmp / "prometheus.yml").write_text(f"""global:
  scrape_interval: {int(SCRAPE_INTERVAL_S * 1000)}ms
  scrape_timeout: {int(SCRAPE_INTERVAL_S * 800)}ms
scrape_configs:
  # What a Kubernetes endpoints discovery + relabel gives the predictor's pods.
  - job_name: kserve-predictor
    metrics_path: /metrics
    static_configs:
{targets}
    relabel_configs:
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_service_name]
        target_label: service
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
""")
        procs.start("prometheus", [
            prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom}", "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ])

        def ready():
            procs.check_alive()
            return all(http_get(f"http://127.0.0.1:{p}/v2/health/ready")[0] == 200 for p in ports)

        wait_for("both replicas to be ready (warm-up)", ready, 60)
        wait_for("Prometheus to be ready", lambda: http_get(f"http://127.0.0.1:{prom}/-/ready")[0] == 200, 20)
        series = f'star_queue_size{{service="{service}"}}'
        wait_for(f"both targets scraped ({series} has 2 series)", lambda: len(prom_query(prom, series)) == 2, 20)

        # Idle.
        v = one_sample(prom_query(prom, query), query)
        if v != 0:
            raise CheckFailed(f"idle: the query gives {v}, expected 0")
        log(f"idle: {query} = {v:g} (one sample)")

        # Load: more to replica 0 than to replica 1, so that avg differs from sum and max.
        k = int(threshold)
        counts = [2 * k + 3, k + 1]
        results: list = []
        lock = threading.Lock()

        def post(port: int, seed: int):
            body = json.dumps({"prompt": "a red circle on a blue background", "n": 1, "seed": seed}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", body,
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    r.read()
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
            except OSError as e:
                code = repr(e)
            with lock:
                results.append(code)

        threads = [threading.Thread(target=post, args=(p, 1000 * i + j), daemon=True)
                   for i, (p, n) in enumerate(zip(ports, counts)) for j in range(n)]
        for t in threads:
            t.start()
        log(f"load: {counts[0]} requests to replica 0, {counts[1]} to replica 1, concurrently")
        time.sleep(0.3)  # every request queued: from here on the queues only shrink

        peak = 0.0
        matched = None
        end = time.monotonic() + 20
        while time.monotonic() < end and matched is None:
            procs.check_alive()
            before = [queue_size(p) for p in ports]
            time.sleep(SCRAPE_INTERVAL_S * 1.6)  # at least one full scrape of both targets
            v = one_sample(prom_query(prom, query), query)
            after = [queue_size(p) for p in ports]
            peak = max(peak, v)
            log(f"load: query = {v:g}; replicas' star_queue_size {before} -> {after}")
            # Queues only shrink now: equal readings around the query mean they held still, so
            # Prometheus's latest scrape of each replica saw exactly these values.
            if before == after and sum(before) > 0:
                want = trigger.expected(before)
                if abs(v - want) > 1e-9:
                    raise CheckFailed(f"load: the query gives {v}, {trigger.aggregation} of the replicas' "
                                      f"star_queue_size {before} is {want}")
                # The load that must scale out: more than `threshold` waiting per replica.
                if sum(before) / len(before) > threshold:
                    matched = (v, before)
        if matched is None:
            raise CheckFailed(f"load: never saw more than {threshold:g} requests waiting per replica "
                              f"with the replicas holding still (query peak {peak:g})")
        v, per = matched
        log(f"load: {query} = {v:g} = {trigger.aggregation} of the replicas' own {per} "
            f"(mean {sum(per) / len(per):g} waiting per replica > threshold {threshold:g})")
        desired, how = trigger.desired_replicas(v, len(ports))
        log(f"load: KEDA ({how}) -> {desired} replicas, from {len(ports)}")
        if v <= threshold:
            problems.append(f"under load the query gives {v:g}, not above the threshold {threshold:g}")
        if desired <= len(ports):
            problems.append(
                f"with {sum(per) / len(per):g} requests waiting per replica (threshold {threshold:g}) KEDA "
                f"would keep {desired} of {len(ports)} replicas: {how}. An avg() query with metricType "
                f"AverageValue divides by the replicas twice; use sum(...) (or metricType: Value)")

        # The drain, sampled: the value KEDA would see falls as the replicas work the queue off.
        end = time.monotonic() + max(1.0, min(45.0, deadline_left() - 10))
        seen = []
        while any(t.is_alive() for t in threads) and time.monotonic() < end:
            procs.check_alive()
            seen.append(one_sample(prom_query(prom, query), query))
            time.sleep(1.0)
        log(f"drain: the query sampled each second: {' '.join(f'{x:g}' for x in seen)}")
        for t in threads:
            t.join(timeout=max(0.1, end - time.monotonic()))
        if any(t.is_alive() for t in threads) or len(results) != len(threads):
            raise CheckFailed(f"not every request was answered in time: {len(results)}/{len(threads)}")
        if any(c != 200 for c in results):
            raise CheckFailed(f"requests failed: {sorted(map(str, results))}")
        log(f"all {len(results)} requests answered 200")

        # Idle again.
        def back_to_zero():
            v = one_sample(prom_query(prom, query), query)
            return (v == 0, v)

        wait_for("the query to return to 0", lambda: back_to_zero()[0], 10)
        v = one_sample(prom_query(prom, query), query)
        direct = [queue_size(p) for p in ports]
        if v != 0 or any(direct):
            raise CheckFailed(f"idle: query {v}, replicas {direct}")
        log(f"idle again: {query} = {v:g} (one sample); replicas' star_queue_size {direct}")
        desired, how = trigger.desired_replicas(v, len(ports))
        log(f"idle: KEDA ({how}) -> {desired} replica(s) (minReplicaCount {trigger.min})")
        if desired != trigger.min:
            problems.append(f"idle: KEDA would keep {desired} replicas, not minReplicaCount {trigger.min}")
        if problems:
            raise CheckFailed("; ".join(problems))
    except CheckFailed as e:
        print(f"FAIL: {e}", flush=True)
        e.reported = True
        procs.dump_logs()
        raise
    finally:
        procs.stop_all()


def main() -> int:
    global SCALED_OBJECT, INFERENCE_SERVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scaledobject", type=Path, default=SCALED_OBJECT)
    ap.add_argument("--inferenceservice", type=Path, default=INFERENCE_SERVICE)
    a = ap.parse_args()
    SCALED_OBJECT, INFERENCE_SERVICE = a.scaledobject, a.inferenceservice
    for f in (SCALED_OBJECT, INFERENCE_SERVICE):
        if not f.exists():
            print(f"FAIL: {f} missing")
            return 1
    timer = threading.Timer(OVERALL_S + 30, kill_everything_and_exit)  # last resort against a hang
    timer.daemon = True
    timer.start()
    with tempfile.TemporaryDirectory(prefix="star-keda-") as tmp:
        try:
            run(Path(tmp))
        except CheckFailed as e:
            if not getattr(e, "reported", False):
                print(f"FAIL: {e}", flush=True)
            return 1
        except Exception as e:  # noqa: BLE001 - reported as a failure, never a hang
            print(f"FAIL: {type(e).__name__}: {e}", flush=True)
            return 1
    print(f"passed: the KEDA query evaluated by Prometheus: idle 0, under load the replicas' own values "
          f"and a scale-out, idle 0 again and a scale-in ({time.monotonic() - T0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
