#!/usr/bin/env python3
"""Throughput and latency of `star-run serve` (benches/RESULTS.md, issue 12).

For each server variant (batching on: --max-batch 8 --max-delay-ms 10; off: --max-batch 1) and
concurrency 1, 4, 16: REQUESTS requests of one image each (mixed prompts and seeds) after a
warm-up, images/s, p50/p95 latency and the server's peak resident memory so far; then `star-run` one-shot per image for comparison.
Standard library only. Usage: benches/scripts/serve-load.py [--model DIR] [--requests N]
"""
import argparse, json, os, statistics, subprocess, sys, threading, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=None)
ap.add_argument("--requests", type=int, default=48)
ap.add_argument("--bin", default="target/release/star-run")
ap.add_argument("--no-one-shot", action="store_true", help="skip the one-shot star-run rows")
a = ap.parse_args()
model = ["--model", a.model] if a.model else []
prompts = ["a red circle on a blue background", "a green square on a yellow background",
           "a white triangle on a black background", "a orange cross on a purple background"]

def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
    return time.perf_counter() - t

def load(port, conc, n):
    lat, lock, nxt = [], threading.Lock(), [0]
    def run():
        while True:
            with lock:
                i = nxt[0]; nxt[0] += 1
            if i >= n:
                return
            d = post(port, {"prompt": prompts[i % 4], "seed": 1000 + i})
            with lock:
                lat.append(d)
    t = time.perf_counter()
    th = [threading.Thread(target=run) for _ in range(conc)]
    [x.start() for x in th]; [x.join() for x in th]
    wall = time.perf_counter() - t
    lat.sort()
    return n / wall, statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]

def serve(extra):
    p = subprocess.Popen([a.bin, "serve", "--port", "0", "--max-queue", "64", *model, *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(p.stdout.readline().split("http://127.0.0.1:")[1].split()[0])
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).read(); break
        except Exception:
            time.sleep(0.1)
    return p, port

print(f"machine: {os.uname().machine}, {os.cpu_count()} cores; model: {a.model or 'embedded demo'}; {a.requests} requests of 1 image per level")
print(f"{'variant':<28}{'conc':>5}{'images/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'peak RSS MB':>13}")

def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
for name, extra in [("batching on (8, 10 ms)", ["--max-batch", "8", "--max-delay-ms", "10"]),
                    ("batching off", ["--max-batch", "1", "--max-delay-ms", "0"])]:
    p, port = serve(extra)
    try:
        load(port, 4, 8)  # warm-up beyond the server's own
        for conc in (1, 4, 16):
            tput, p50, p95 = load(port, conc, a.requests)
            print(f"{name:<28}{conc:>5}{tput:>10.2f}{p50*1e3:>10.1f}{p95*1e3:>10.1f}{peak_rss_mb(p.pid):>13.0f}", flush=True)
    finally:
        p.terminate(); p.wait()
ts = []
for i in range(0 if a.no_one_shot else 5):
    t = time.perf_counter()
    subprocess.run([a.bin, *model, "--prompt", prompts[i % 4], "--seed", str(i), "--quiet", "--out", "/tmp/serve-load-oneshot.png"], check=True)
    ts.append(time.perf_counter() - t)
if ts:
    print(f"{'star-run one-shot per image':<28}{1:>5}{1/statistics.median(ts):>10.2f}{statistics.median(ts)*1e3:>10.1f}{max(ts)*1e3:>10.1f}")
