#!/usr/bin/env python3
"""Peak memory of one `step` run over what the weights and the KV cache already hold.

    .venv/bin/python benches/scripts/step-transient.py MODEL_DIR [VARIANT] [SECONDS] [SCALE]

The step is bound as star-run binds it: every `past_{i}` a view of block i's region of one
block-major cache, every `kv_new_{i}` written in place after it. The whole cache is touched
before the run, so the peak over the RSS before the run is the run's own transient (intermediate
values, ONNX Runtime's arena and planner). Every block runs the same graph, so the first SECONDS
(default 40) of a d30/1024 scale-13 run show the peak of the whole step; the run is then left.

VARIANT picks ONNX Runtime settings (any combination, joined with '-'): default, noarena,
nopattern, noreuse (mem reuse off: Python only, the C API has no setting for it), same (an
environment CPU arena that grows by what is asked, not by powers of two). benches/RESULTS.md.
"""
import json, os, sys, threading, time

import numpy as np
import onnxruntime as ort

model = sys.argv[1]
variant = sys.argv[2] if len(sys.argv) > 2 else "default"
secs = float(sys.argv[3]) if len(sys.argv) > 3 else 40.0
m = json.load(open(f"{model}/manifest.json"))
step = next(g for g in m["graphs"] if g["stage"] == "step")
scale = int(sys.argv[4]) if len(sys.argv) > 4 else step["profiles"][-1]["scale"]
prof = next(p for p in step["profiles"] if p["scale"] == scale)
past = prof["inputs"][1]["shape"][0]
n = prof["outputs"][0]["shape"][0]
cfg = m["config"]
depth, heads, width = cfg["depth"], cfg["heads"], cfg["width"]


def rss_gb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return 0.0


so = ort.SessionOptions()
so.intra_op_num_threads = 2
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
parts = set(variant.split("-"))
so.enable_cpu_mem_arena = "noarena" not in parts
so.enable_mem_pattern = "nopattern" not in parts
so.enable_mem_reuse = "noreuse" not in parts
if "same" in parts:
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
    so.add_session_config_entry("session.use_env_allocators", "1")
t = time.time()
sess = ort.InferenceSession(f"{model}/step.onnx", so, providers=["CPUExecutionProvider"])
print(f"{variant}: step session created in {time.time() - t:.1f} s, RSS {rss_gb():.2f} GB", flush=True)

cache = np.ones((depth, past + n, 2, 2, heads, 64), np.float32)
rng = np.random.default_rng(0)
x = rng.standard_normal((2, n, width), dtype=np.float32)
text_kv = rng.standard_normal((depth, 2, 1, heads, 77, 64), dtype=np.float32)
text_bias = np.zeros((1, 1, 1, 77), np.float32)
io = sess.io_binding()
io.bind_cpu_input("x", x)
io.bind_cpu_input("text_kv", text_kv)
io.bind_cpu_input("text_bias", text_bias)
views = []
for i in range(depth):
    p = ort.OrtValue.ortvalue_from_numpy(cache[i, :past])
    o = ort.OrtValue.ortvalue_from_numpy(cache[i, past:])
    views += [p, o]
    io.bind_ortvalue_input(f"past_{i}", p)
    io.bind_ortvalue_output(f"kv_new_{i}", o)
io.bind_output("hidden", "cpu")
io.bind_output("logits", "cpu")

base = rss_gb()
peak = [base]


def poll():
    while True:
        peak[0] = max(peak[0], rss_gb())
        time.sleep(0.05)


threading.Thread(target=poll, daemon=True).start()
t = time.time()
run = threading.Thread(target=lambda: sess.run_with_iobinding(io), daemon=True)
run.start()
run.join(secs)
state = "done in" if not run.is_alive() else "left after"
print(
    f"{variant}: scale {scale} ({n} tokens, past {past}): RSS before {base:.2f} GB, "
    f"peak {peak[0]:.2f} GB, transient +{peak[0] - base:.2f} GB ({state} {time.time() - t:.0f} s)",
    flush=True,
)
os._exit(0)
