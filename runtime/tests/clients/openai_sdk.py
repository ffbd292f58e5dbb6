"""The official OpenAI Python SDK against `star-run serve` (run by runtime/tests/clients.rs).

usage: openai_sdk.py PORT OUT_DIR
Writes OUT_DIR/plain.png (seed 7, not streamed) for the Rust side to compare with the CLI.
Strict response validation: every response must parse as the SDK's own types.
"""
import asyncio
import base64
import os
import struct
import sys

import openai

port, out = int(sys.argv[1]), sys.argv[2]
base = f"http://127.0.0.1:{port}/v1"
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, _strict_response_validation=True)
PROMPT = "a red circle on a blue background"


def png_size(b: bytes):
    assert b[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", b[16:24])


# Models: list and retrieve; a missing one is NotFoundError with the server's message.
models = client.models.list()
model_id = models.data[0].id
assert client.models.retrieve(model_id).id == model_id
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("retrieve of a missing model succeeded")
except openai.NotFoundError as e:
    assert "does not exist" in e.message and e.code == "model_not_found", (e.message, e.code)

# Generate, with OpenAI's own defaults spelled out.
r = client.images.generate(
    prompt=PROMPT, size="auto", quality="auto", background="auto", moderation="auto",
    extra_body={"seed": 7},
)
plain = base64.b64decode(r.data[0].b64_json)
side = png_size(plain)
assert r.size == f"{side[0]}x{side[1]}", (r.size, side)
assert r.usage.output_tokens > 0 and r.usage.input_tokens > 0, r.usage
with open(os.path.join(out, "plain.png"), "wb") as f:
    f.write(plain)

# Streamed with two previews: partial images 0 and 1 (PNGs of the model's size), then the
# completed image, byte-identical to the one not streamed.
events = list(client.images.generate(prompt=PROMPT, stream=True, partial_images=2, extra_body={"seed": 7}))
kinds = [e.type for e in events]
assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
assert [e.partial_image_index for e in events[:2]] == [0, 1]
for e in events[:2]:
    preview = base64.b64decode(e.b64_json)
    assert png_size(preview) == side, png_size(preview)
    assert preview != plain, "a preview equals the final image"
done = events[-1]
assert base64.b64decode(done.b64_json) == plain, "the streamed image differs from the plain one"
assert done.usage.total_tokens == r.usage.total_tokens
# Without previews: just the completed event.
kinds = [e.type for e in client.images.generate(prompt=PROMPT, stream=True, extra_body={"seed": 7})]
assert kinds == ["image_generation.completed"], kinds


# Eight concurrent requests (AsyncOpenAI): each the image its seed makes alone.
async def concurrent():
    a = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, _strict_response_validation=True)
    rs = await asyncio.gather(*[
        a.images.generate(prompt=PROMPT, extra_body={"seed": 100 + i}) for i in range(8)
    ])
    await a.close()
    return [x.data[0].b64_json for x in rs]


together = asyncio.run(concurrent())
for i in (0, 5):
    alone = client.images.generate(prompt=PROMPT, extra_body={"seed": 100 + i}).data[0].b64_json
    assert together[i] == alone, f"concurrent request {i} differs from the same request alone"
assert len(set(together)) == 8, "different seeds gave the same image"


# Each error class carries the server's message.
def expect(cls, status, needle, call):
    try:
        call()
    except cls as e:
        assert e.status_code == status, (e.status_code, status)
        assert needle in e.message, (needle, e.message)
        assert e.code is None or isinstance(e.code, str), e.code
        return e
    raise AssertionError(f"no {cls.__name__} ({status})")


e = expect(openai.UnprocessableEntityError, 422, "one quality",
           lambda: client.images.generate(prompt=PROMPT, quality="high"))
assert e.param == "quality" and e.code == "invalid_value" and e.type == "invalid_request_error"
e = expect(openai.UnprocessableEntityError, 422, "unknown field",
           lambda: client.images.generate(prompt=PROMPT, extra_body={"colour": "red"}))
assert e.param == "colour" and e.code == "unknown_parameter"
expect(openai.UnprocessableEntityError, 422, "between 0 and 3",
       lambda: client.images.generate(prompt=PROMPT, stream=True, partial_images=5))
expect(openai.BadRequestError, 400, "not JSON",
       lambda: client.post("/images/generations", cast_to=object, content=b'{"prompt": ',
                           options={"headers": {"Content-Type": "application/json"}}))
expect(openai.NotFoundError, 404, "Invalid URL (POST /v1/chat/completions)",
       lambda: client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}]))
expect(openai.APIStatusError, 405, "method not allowed",
       lambda: client.get("/images/generations", cast_to=object))
expect(openai.APIStatusError, 413, "over this server's limit",
       lambda: client.images.generate(prompt="x" * (2 << 20)))
print("openai SDK", openai.__version__, "ok")
