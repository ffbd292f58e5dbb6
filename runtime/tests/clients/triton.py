"""tritonclient (HTTP, the KServe v2 client) against `star-run serve` (run by
runtime/tests/clients.rs).

usage: triton.py PORT OUT_DIR
Writes OUT_DIR/triton.rgb (seed 7's image, H x W x 3) for the Rust side to compare with the CLI.
"""
import os
import sys

import numpy as np
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

port, out = int(sys.argv[1]), sys.argv[2]
c = th.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120.0)
PROMPT = "a red circle on a blue background"

assert c.is_server_live() and c.is_server_ready()
meta = c.get_server_metadata()
assert meta["name"] == "star-deploy" and "binary_tensor_data" in meta["extensions"], meta
import json
import urllib.request
name = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"][0]["id"]
model = c.get_model_metadata(name)
version = model["versions"][0]
assert c.is_model_ready(name) and c.is_model_ready(name, version)
assert not c.is_model_ready("other-model")
assert not c.is_model_ready(name, "no-such-version")
inputs = {t["name"]: t for t in model["inputs"]}
assert inputs["prompt"]["datatype"] == "BYTES" and inputs["seed"]["datatype"] == "INT64", inputs
(out_meta,) = model["outputs"]
assert out_meta["name"] == "image" and out_meta["datatype"] == "UINT8", out_meta


def prompt(binary=True):
    t = th.InferInput("prompt", [1], "BYTES")
    t.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object), binary_data=binary)
    return t


def seed(binary=True):
    t = th.InferInput("seed", [1], "INT64")
    t.set_data_from_numpy(np.array([7], dtype=np.int64), binary_data=binary)
    return t


# Binary tensors both ways.
r = c.infer(name, [prompt(), seed()], outputs=[th.InferRequestedOutput("image", binary_data=True)], request_id="r1")
img = r.as_numpy("image")
assert img.dtype == np.uint8 and img.shape == tuple(out_meta["shape"]), (img.dtype, img.shape)
assert r.get_response()["id"] == "r1"
img.tofile(os.path.join(out, "triton.rgb"))
# JSON tensors both ways; no outputs named (binary_data_output); seed as a request parameter;
# a version named: the same pixels.
r = c.infer(name, [prompt(False), seed(False)], outputs=[th.InferRequestedOutput("image", binary_data=False)])
assert np.array_equal(r.as_numpy("image"), img)
assert np.array_equal(c.infer(name, [prompt(), seed()]).as_numpy("image"), img)
assert np.array_equal(c.infer(name, [prompt()], parameters={"seed": 7}).as_numpy("image"), img)
assert np.array_equal(c.infer(name, [prompt(), seed()], model_version=version).as_numpy("image"), img)
# Another seed, another image.
other = c.infer(name, [prompt()], parameters={"seed": 8}).as_numpy("image")
assert not np.array_equal(other, img)


# Errors in the protocol's shape: the exception carries the server's message.
def refused(needle, call):
    try:
        call()
    except InferenceServerException as e:
        assert needle in e.message(), (needle, e.message())
        return
    raise AssertionError(f"not refused: {needle}")


bad = th.InferInput("colour", [1], "BYTES")
bad.set_data_from_numpy(np.array([b"red"], dtype=object))
refused("unknown input 'colour'", lambda: c.infer(name, [prompt(), bad]))
refused("given both as an input and as a parameter", lambda: c.infer(name, [prompt(), seed()], parameters={"seed": 1}))
refused("is not served here", lambda: c.infer("other-model", [prompt()]))
refused("'prompt' (BYTES) is required", lambda: c.infer(name, [seed()]))
cfg = th.InferInput("cfg_scale", [1], "FP32")
cfg.set_data_from_numpy(np.array([-1.0], dtype=np.float32))
refused("cfg_scale: -1 is negative", lambda: c.infer(name, [prompt(), cfg]))
print("tritonclient ok")
