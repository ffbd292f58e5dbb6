"""A roofline of every stage of a model directory on this CPU.

For each stage, and each scale of `step` (and `sampler`), from the graphs' shapes: the FLOPs
of its products (MatMul, Gemm, Conv; a product whose weight is dequantized from INT8 counts as
integer ops), the time `star-run bench` measured, the GFLOP/s that makes, and the fraction of
this CPU's measured peak at that precision (a GEMM and a 3x3 convolution through ONNX Runtime,
same threads). Then, from ONNX Runtime's profiler on the decoder and the largest step, where
the time goes per op type.

usage:
  star-run bench --model DIR --runs 5 --json bench.json
  python benches/scripts/roofline.py DIR bench.json [--threads 2] [--profile-runs 3]

Needs the project's .venv (onnx, onnxruntime). Prints a Markdown report.
"""
import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference


def cpu_name_and_features():
    name, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"]
    return name, [f for f in wanted if f in flags]


def session(model_bytes_or_path, threads, profile_dir=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "prof")
    return ort.InferenceSession(model_bytes_or_path, so, providers=["CPUExecutionProvider"])


def median_s(run, reps):
    run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak(threads, reps=10):
    """Measured peaks (GFLOP/s or G int-op/s): FP32 GEMM, INT8 GEMM (QDQ, as the graphs are
    written), FP32 3x3 conv."""
    m, k, n = 512, 1024, 4096
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    fp32 = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=9,
    )
    wq = numpy_helper.from_array(rng.integers(-63, 64, (k, n)).astype(np.int8), "wq")
    sc = numpy_helper.from_array(np.array(0.01, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.uint8), "zp")
    zw = numpy_helper.from_array(np.array(0, np.int8), "zw")
    int8 = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
                helper.make_node("DequantizeLinear", ["wq", "s", "zw"], ["wd"]),
                helper.make_node("MatMul", ["xd", "wd"], ["y"]),
            ],
            "g", [x], [y], [wq, sc, zp, zw],
        ),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=9,
    )
    c, hw = 128, 64
    xc = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])
    yc = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])
    wc = numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w")
    conv = helper.make_model(
        helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g", [xc], [yc], [wc]
        ),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=9,
    )
    out = {}
    feeds = {"x": rng.standard_normal((m, k)).astype(np.float32)}
    for label, model in [("fp32", fp32), ("int8", int8)]:
        s = session(model.SerializeToString(), threads)
        out[label] = 2 * m * k * n / median_s(lambda: s.run(None, feeds), reps) / 1e9
    s = session(conv.SerializeToString(), threads)
    fc = {"x": rng.standard_normal((1, c, hw, hw)).astype(np.float32)}
    out["conv_fp32"] = 2 * c * c * 9 * hw * hw / median_s(lambda: s.run(None, fc), reps) / 1e9
    return out


def concrete(model, dims):
    """The graph with its symbolic input dims fixed, shapes inferred (no weights loaded)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        for d in i.type.tensor_type.shape.dim:
            if d.dim_param:
                if d.dim_param not in dims:
                    raise SystemExit(f"no value for dim '{d.dim_param}' of {i.name}")
                d.dim_value = dims[d.dim_param]
    return shape_inference.infer_shapes(m, data_prop=True)


def products(model):
    """(FLOPs in FP32 products, int ops in INT8 products) of a graph with known shapes."""
    shapes = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    producer = {o: n for n in model.graph.node for o in n.output}

    def int8_weight(name):
        n = producer.get(name)
        while n is not None and n.op_type in ("Transpose", "Reshape", "Identity"):
            n = producer.get(n.input[0])
        return n is not None and n.op_type == "DequantizeLinear"

    fp, it = 0, 0
    for n in model.graph.node:
        flops = 0
        if n.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(n.input[0]), shapes.get(n.input[1])
            if a and b and len(a) >= 2 and len(b) >= 2 and all(a) and all(b):
                if n.op_type == "Gemm" and any(x.name == "transB" and x.i for x in n.attribute):
                    b = b[::-1]
                batch = int(np.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])) or [1]))
                flops = 2 * batch * a[-2] * a[-1] * b[-1]
        elif n.op_type == "Conv":
            w, y = shapes.get(n.input[1]), shapes.get(n.output[0])
            if w and y and all(w) and all(y):
                flops = 2 * int(np.prod(y)) * int(np.prod(w[1:]))
        if flops:
            if int8_weight(n.input[1]):
                it += flops
            else:
                fp += flops
    return fp, it


def stage_rows(model_dir, manifest, bench):
    """One row per timed stage run: (label, precision, GFLOP, G int-op, median ms)."""
    graphs = {g["stage"]: g for g in manifest["graphs"]}
    sched = manifest["schedule"]
    stages = bench["stages"]
    loaded = {}

    def graph(stage):
        if stage not in loaded:
            loaded[stage] = onnx.load(os.path.join(model_dir, graphs[stage]["file"]), load_external_data=False)
        return loaded[stage]

    rows = []
    base = {"B": 1, "B2": 2, "N": 2}
    for label, stage in [("text_encoder", "text_encoder"), ("text_kv", "text_kv")]:
        if label in stages:
            fp, it = products(concrete(graph(stage), base))
            rows.append((label, graphs[stage]["precision"], fp, it, stages[label]["median_ms"]))
    for si, pn in enumerate(sched["patch_nums"]):
        label = f"step[{si:02d}]"
        if label not in stages:
            continue
        stage = "step_first" if si == 0 and "step_first" in graphs else "step"
        begin = sched["begin_end"][si][0]
        dims = dict(base, tokens=pn * pn, past=begin, n=pn * pn)
        fp, it = products(concrete(graph(stage), dims))
        rows.append((label, graphs[stage]["precision"], fp, it, stages[label]["median_ms"]))
    if "decoder" in stages:
        fp, it = products(concrete(graph("decoder"), base))
        rows.append(("decoder", graphs["decoder"]["precision"], fp, it, stages["decoder"]["median_ms"]))
    return rows


def random_feeds(sess, dims):
    rng = np.random.default_rng(1)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else dims[d] for d in i.shape]
        if "int64" in i.type:
            feeds[i.name] = np.zeros(shape, np.int64)
        elif "float16" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float16)
        else:
            feeds[i.name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return feeds


def op_breakdown(path, dims, threads, runs):
    """Time per op type (ms per run) from ONNX Runtime's profiler, largest first."""
    with tempfile.TemporaryDirectory() as d:
        s = session(path, threads, profile_dir=d)
        feeds = random_feeds(s, dims)
        s.run(None, feeds)
        for _ in range(runs):
            s.run(None, feeds)
        trace = json.load(open(s.end_profiling()))
    per = collections.Counter()
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per[e["args"].get("op_name", "?")] += e["dur"] / 1e3
    total = sum(per.values())
    return [(op, ms / (runs + 1), 100 * ms / total) for op, ms in per.most_common(8)], total / (runs + 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("bench_json")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--profile-runs", type=int, default=3)
    a = ap.parse_args()
    manifest = json.load(open(os.path.join(a.model_dir, "manifest.json")))
    bench = json.load(open(a.bench_json))
    name, feats = cpu_name_and_features()
    pk = peak(a.threads)
    print(f"CPU: {name}, {os.cpu_count()} cores, {a.threads} threads; features: {', '.join(feats) or 'none of note'}")
    print(f"ONNX Runtime {ort.__version__}; model {manifest['model_hash']} ({manifest['precision']}, d{manifest['config']['depth']}, {manifest['schedule']['image_size']} px)")
    print(f"Measured peaks: FP32 GEMM {pk['fp32']:.1f} GFLOP/s, INT8 GEMM (QDQ) {pk['int8']:.1f} G int-op/s, FP32 3x3 conv {pk['conv_fp32']:.1f} GFLOP/s\n")
    print("| stage | precision | GFLOP (fp32) | G int-op (int8) | median ms | achieved G/s | of peak |")
    print("|---|---|---|---|---|---|---|")
    total_ms = 0.0
    for label, prec, fp, it, ms in stage_rows(a.model_dir, manifest, bench):
        total_ms += ms
        ops = fp + it
        rate = ops / (ms / 1e3) / 1e9 if ms > 0 else 0.0
        # The peak the stage could reach: its ops at their precision's peak rate.
        ideal_s = fp / (1e9 * (pk["conv_fp32"] if label == "decoder" else pk["fp32"])) + it / (1e9 * pk["int8"])
        frac = ideal_s / (ms / 1e3) if ms > 0 else 0.0
        print(f"| {label} | {prec} | {fp / 1e9:.3f} | {it / 1e9:.3f} | {ms:.1f} | {rate:.1f} | {100 * frac:.0f}% |")
    e2e = bench["stages"].get("end_to_end", {}).get("median_ms")
    if e2e:
        print(f"\nTimed stages: {total_ms:.0f} ms of {e2e:.0f} ms end to end (the rest: sample graph, VQ, tokenizer, runtime).")
    sched = manifest["schedule"]
    last = len(sched["patch_nums"]) - 1
    pn = sched["patch_nums"][last]
    files = {g["stage"]: g["file"] for g in manifest["graphs"]}
    for label, file, dims in [
        ("decoder", files["decoder"], {"B": 1}),
        (f"step[{last:02d}]", files["step"], {"B": 1, "B2": 2, "tokens": pn * pn, "n": pn * pn, "past": sched["begin_end"][last][0]}),
    ]:
        ops, total = op_breakdown(os.path.join(a.model_dir, file), dims, a.threads, a.profile_runs)
        print(f"\nWhere {label}'s time goes (ONNX Runtime profiler, random inputs, {total:.0f} ms of kernels per run):\n")
        print("| op type | ms per run | share |")
        print("|---|---|---|")
        for op, ms, pct in ops:
            print(f"| {op} | {ms:.1f} | {pct:.0f}% |")


if __name__ == "__main__":
    main()
