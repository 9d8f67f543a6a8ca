"""The HTTP server (rawformer.server): a real aiohttp server on 127.0.0.1 (ephemeral port) over an Engine with
a tiny random byte-level GPT-2 on the CPU, driven by an aiohttp client.

Load test: 200 concurrent requests of mixed prompt / output lengths, completions and chat, streamed and not;
every one completes or is refused with 429 / 503, and each completed greedy result equals the same request
run alone (rawformer.runtime.generate). Disconnects (streamed and not) cancel the request and free its
blocks. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from rawformer.export.tokenizer import ByteTokenizer
from rawformer.models import GPT2Config, init_random

from rawformer.runtime import generate
from rawformer.runtime.engine import Engine

aiohttp = pytest.importorskip("aiohttp")
from rawformer.server import Server, chat_prompt  # noqa: E402

CFG = GPT2Config(vocab_size=257, n_positions=512, n_embd=32, n_layer=2, n_head=4)
TIMEOUT = aiohttp.ClientTimeout(total=45)


@pytest.fixture(scope="module")
def model():
    return init_random(CFG, 1, np.float32, np, std=0.3)


class SlowModel:
    """The model with a pause in each forward, so a request is surely still running when its client leaves."""

    def __init__(self, model, pause=0.005):
        self.m, self.pause = model, pause

    def __getattr__(self, name):
        return getattr(self.m, name)

    def forward(self, batch, arena, last_only=False):
        time.sleep(self.pause)
        return self.m.forward(batch, arena, last_only=last_only)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 55))


async def serving(engine):
    server = Server(engine)
    port = await server.start()
    return server, f"http://127.0.0.1:{port}"


async def read_sse(resp):
    """The JSON chunks of an SSE response, and whether [DONE] closed it."""
    chunks, done = [], False
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunks.append(json.loads(line[6:]))
    return chunks, done


async def wait_until(pred, seconds=10.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


# ---- the load test -------------------------------------------------------------------------------------


def test_load_200_concurrent_requests_complete_or_are_refused(model):
    tok = ByteTokenizer()
    rng = np.random.default_rng(7)
    words = ["alpha", "beta", "gamma", "delta", "rawformer", "paged", "cache", "serve", "token", "batch"]
    reqs = []
    for i in range(200):
        n_words = int(rng.integers(1, 12))
        text = " ".join(rng.choice(words, n_words))
        max_tokens = int(rng.integers(1, 24))
        kind = ["completion", "completion_ids", "chat"][i % 3]
        reqs.append(dict(i=i, text=text, max_tokens=max_tokens, kind=kind, stream=bool(i % 2)))
    engine = Engine(model, tok, kv_tokens=4096, block_size=16, max_num_seqs=32, max_queue=120,
                    max_num_batched_tokens=256)  # fmt: skip

    async def one(session, base, r):
        body = dict(max_tokens=r["max_tokens"], temperature=0, stream=r["stream"], return_token_ids=True)
        body["ignore_eos"] = True
        if r["kind"] == "chat":
            url = base + "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": r["text"]}]
        else:
            url = base + "/v1/completions"
            body["prompt"] = tok.encode(r["text"]) if r["kind"] == "completion_ids" else r["text"]
        async with session.post(url, json=body) as resp:
            if resp.status in (429, 503):
                err = await resp.json()
                assert "error" in err and err["error"]["message"]
                return resp.status, None, None
            assert resp.status == 200, await resp.text()
            if not r["stream"]:
                data = await resp.json()
                ch = data["choices"][0]
                assert data["usage"]["completion_tokens"] == len(ch["token_ids"]) == r["max_tokens"]
                text = ch["message"]["content"] if r["kind"] == "chat" else ch["text"]
                return 200, ch["token_ids"], text
            chunks, done = await read_sse(resp)
            assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
            ids = [t for c in chunks for t in c["choices"][0].get("token_ids", [])]
            key = "delta" if r["kind"] == "chat" else None
            text = "".join(
                c["choices"][0][key].get("content", "") if key else c["choices"][0]["text"] for c in chunks
            )
            return 200, ids, text

    async def main():
        server, base = await serving(engine)
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                results = await asyncio.gather(*(one(session, base, r) for r in reqs))
                async with session.get(base + "/metrics") as resp:
                    metrics = await resp.text()
        finally:
            await server.stop()
        return results, metrics

    results, metrics = run(main())
    codes = [c for c, _, _ in results]
    assert len(results) == 200 and set(codes) <= {200, 429, 503}
    done = [(r, ids, text) for r, (c, ids, text) in zip(reqs, results, strict=True) if c == 200]
    assert len(done) >= 100  # the queue holds 120 waiting + 32 running
    for r, ids, text in done:
        prompt_text = (
            chat_prompt([{"role": "user", "content": r["text"]}], tok) if r["kind"] == "chat" else r["text"]
        )
        alone = generate(model, [tok.encode(prompt_text)], r["max_tokens"], tokenizer=tok, ignore_eos=True)
        assert ids == alone.token_ids[0], f"request {r['i']} differs from the same request run alone"
        assert text == alone.texts[0]
    refused = codes.count(429) + codes.count(503)
    assert f"rawformer_requests_rejected_total {refused}" in metrics
    assert "rawformer_kv_blocks_used 0" in metrics
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


# ---- disconnects ---------------------------------------------------------------------------------------


def test_client_disconnect_cancels_and_frees_blocks(model):
    engine = Engine(SlowModel(model), ByteTokenizer(), kv_tokens=2048, block_size=16, max_num_seqs=8)
    body = {"prompt": "disconnect me", "max_tokens": 400, "temperature": 0, "ignore_eos": True}

    async def main():
        server, base = await serving(engine)
        try:
            # streamed: read two chunks, then close the connection
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                async with session.post(base + "/v1/completions", json={**body, "stream": True}) as resp:
                    assert resp.status == 200
                    seen = 0
                    async for raw in resp.content:
                        seen += raw.startswith(b"data: ")
                        if seen >= 2:
                            break
                    assert engine.pool.stats().blocks_used > 0
                    resp.close()
            assert await wait_until(lambda: engine.summary()["requests_aborted_total"] == 1)
            assert await wait_until(lambda: engine.pool.stats().blocks_used == 0)
            # not streamed: the client gives up while the request runs
            short = aiohttp.ClientTimeout(total=0.4)
            async with aiohttp.ClientSession(timeout=short) as session:
                with pytest.raises(asyncio.TimeoutError):
                    async with session.post(base + "/v1/completions", json=body) as resp:
                        await resp.read()
            assert await wait_until(lambda: engine.summary()["requests_aborted_total"] == 2)
            assert await wait_until(lambda: engine.pool.stats().blocks_used == 0)
            assert not engine.has_unfinished
        finally:
            await server.stop()

    run(main())
    engine.pool.check()


# ---- the API surface -----------------------------------------------------------------------------------


def test_endpoints_validation_and_errors(model):
    tok = ByteTokenizer()
    engine = Engine(SlowModel(model, 0.01), tok, kv_tokens=1024, block_size=16, max_num_seqs=1, max_queue=1,
                    name="tiny-bytes")  # fmt: skip

    async def main():
        server, base = await serving(engine)
        out = {}
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                async with s.get(base + "/health") as r:
                    out["health"] = (r.status, await r.json())
                async with s.get(base + "/v1/models") as r:
                    out["models"] = await r.json()
                bad = [
                    b"{not json",
                    json.dumps({"prompt": "x", "max_tokens": 0}).encode(),
                    json.dumps({"prompt": "x", "temperature": "hot"}).encode(),
                    json.dumps({"prompt": "x", "n": 2}).encode(),
                    json.dumps({"prompt": ""}).encode(),
                    json.dumps({"prompt": [1, -2]}).encode(),
                    json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).encode(),
                    json.dumps({"prompt": "x" * 600}).encode(),  # longer than the model's 512 positions
                    json.dumps([1, 2]).encode(),
                ]
                out["bad"] = []
                for b in bad:
                    async with s.post(base + "/v1/completions", data=b,
                                      headers={"Content-Type": "application/json"}) as r:  # fmt: skip
                        out["bad"].append((r.status, await r.json()))
                async with s.post(base + "/v1/chat/completions", json={"messages": "hi"}) as r:
                    out["bad_chat"] = (r.status, await r.json())
                async with s.post(base + "/v1/completions", json={"prompt": "x", "model": "other"}) as r:
                    out["model"] = r.status
                async with s.get(base + "/nowhere") as r:
                    out["404"] = (r.status, await r.json())
                # the queue holds one waiting request: more arriving at once get 429
                body = {"prompt": "busy", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
                rs = await asyncio.gather(*(s.post(base + "/v1/completions", json=body) for _ in range(6)))
                out["busy"] = sorted(r.status for r in rs)
                for r in rs:
                    await r.read()
                    r.release()
                async with s.post(
                    base + "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0},
                ) as r:
                    out["chat"] = await r.json()
                async with s.get(base + "/metrics") as r:
                    out["metrics"] = (r.status, r.headers["Content-Type"], await r.text())
                engine.stop()  # the engine goes away under the server: 503
                async with s.post(base + "/v1/completions", json={"prompt": "x"}) as r:
                    out["stopped"] = r.status
                async with s.get(base + "/health") as r:
                    out["health_stopped"] = r.status
        finally:
            await server.stop()
        return out

    out = run(main())
    assert out["health"][0] == 200 and out["health"][1]["status"] == "ok"
    assert out["models"]["data"][0]["id"] == "tiny-bytes"
    for status, err in out["bad"]:
        assert status == 400 and err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert out["bad"][1][1]["error"]["param"] == "max_tokens"
    assert out["bad"][2][1]["error"]["param"] == "temperature"
    assert "512" in out["bad"][7][1]["error"]["message"] or "fit" in out["bad"][7][1]["error"]["message"]
    assert out["bad_chat"][0] == 400 and out["bad_chat"][1]["error"]["param"] == "messages"
    assert out["model"] == 404 and out["404"][0] == 404 and "error" in out["404"][1]
    assert out["busy"].count(200) >= 1 and out["busy"].count(429) >= 1 and set(out["busy"]) <= {200, 429}
    ch = out["chat"]
    assert ch["object"] == "chat.completion" and ch["choices"][0]["message"]["role"] == "assistant"
    assert ch["usage"]["prompt_tokens"] == len(
        tok.encode(chat_prompt([{"role": "user", "content": "hi"}], tok))
    )
    status, ctype, text = out["metrics"]
    assert status == 200 and ctype.startswith("text/plain")
    names = [
        "queue_depth",
        "running",
        "kv_blocks_used",
        "tokens_per_second",
        "request_latency_seconds_bucket",
    ]
    for name in names + ["time_to_first_token_seconds_count", "adaptive_token_budget"]:
        assert f"rawformer_{name}" in text
    assert out["stopped"] == 503 and out["health_stopped"] == 503
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
