"""The HTTP server: an aiohttp app over an Engine running its step loop on its own thread.

Routes
------
POST /v1/completions        OpenAI completions (protocol.py lists the fields), JSON or SSE (stream: true)
POST /v1/chat/completions   OpenAI chat completions, JSON or SSE
GET  /v1/models             the one model served
GET  /health                200 {"status": "ok"} while the engine loop runs, else 503
GET  /metrics               Prometheus text: queue depth, running, KV blocks, tokens/s, latency histograms,
                            the adaptive batcher's knobs

Errors are JSON bodies {"error": {"message", "type", "param", "code"}}: 400 for a bad request (validation,
a prompt too long for the model), 404 for an unknown model or route, 429 when the engine's queue is full,
503 when the engine is stopped, 500 when the request failed inside the model.

Hand-off between threads: each request gets an asyncio.Queue; the engine's callback (on the engine thread)
puts every RequestOutput into it with loop.call_soon_threadsafe. A client that goes away cancels its request:
the handler is cancelled (handler_cancellation) or its next write fails, or the wait loop sees the transport
closing; any of them calls engine.abort, and the engine frees the request's blocks at its next step.

Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from rawformer.runtime.engine import Engine, EngineClosed, QueueFull
from rawformer.server import protocol
from rawformer.server.protocol import BadRequest, error_body

__all__ = ["ENGINE", "Server", "create_app", "run"]

ENGINE = web.AppKey("engine", Engine)
POLL_S = 0.25  # how often a waiting handler checks that its client is still there


def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(message, kind, param, status), status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return _error(exc.status, exc.reason, "not_found_error" if exc.status == 404 else "http_error")
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug: the client still gets JSON
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error")


def _gone(request: web.Request) -> bool:
    t = request.transport
    return t is None or t.is_closing()


async def _next(q: asyncio.Queue, request: web.Request) -> Any:
    """The next output, or ConnectionResetError when the client has gone."""
    while True:
        try:
            return await asyncio.wait_for(q.get(), POLL_S)
        except asyncio.TimeoutError:
            if _gone(request):
                raise ConnectionResetError("client disconnected") from None


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _error(400, f"the body is not valid JSON: {exc}", "invalid_request_error")
    try:
        if chat:
            parsed = protocol.parse_chat(body, engine.tokenizer)
        else:
            parsed = protocol.parse_completion(body)
        if isinstance(parsed.prompt, str) and engine.tokenizer is None:
            raise BadRequest("this server has no tokenizer: send the prompt as token ids", "prompt")
    except BadRequest as exc:
        return web.json_response(exc.body(), status=400)
    if parsed.model is not None and parsed.model != engine.name:
        return _error(404, f"the model {parsed.model!r} does not exist (serving {engine.name!r})",
                      "not_found_error", "model")  # fmt: skip
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    try:
        rid = engine.add_request(
            parsed.prompt, on_output=lambda o: loop.call_soon_threadsafe(q.put_nowait, o), **parsed.kwargs
        )
    except QueueFull as exc:
        return _error(429, str(exc), "rate_limit_error")
    except EngineClosed as exc:
        return _error(503, str(exc), "server_error")
    except (ValueError, TypeError) as exc:
        return _error(400, str(exc), "invalid_request_error")
    cid = protocol.new_id(chat)
    done = False
    try:
        if not parsed.stream:
            while True:
                out = await _next(q, request)
                if out.finished:
                    done = True
                    break
            if out.finish_reason == "error":
                return _error(500, f"the request failed: {out.error}", "server_error")
            if out.finish_reason == "abort":
                return _error(503, "the request was cancelled (server stopping)", "server_error")
            return web.json_response(protocol.response_body(parsed, cid, engine.name, out))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        first = True
        while True:
            out = await _next(q, request)
            done = out.finished
            if out.new_text or out.finished or first or (parsed.return_token_ids and out.new_token_ids):
                chunk = protocol.chunk_body(parsed, cid, engine.name, out, first)
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                first = False
            if done:
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    finally:
        if not done:  # cancelled, disconnected or failed: free the request's blocks
            engine.abort(rid)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    card = {"id": engine.name, "object": "model", "created": int(engine.started), "owned_by": "rawformer"}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    ok = engine.running and not engine.closed
    body = {
        "status": "ok" if ok else "unavailable",
        "model": engine.name,
        "uptime_s": time.time() - engine.started,
    }
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    text = request.app[ENGINE].prometheus()
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Format": "0.0.4"})


def create_app(engine: Engine) -> web.Application:
    """The aiohttp application serving `engine` (start the engine's loop with engine.start())."""
    app = web.Application(middlewares=[_json_errors], client_max_size=8 << 20)
    app[ENGINE] = engine
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


class Server:
    """The app on a TCP port, for tests and embedding: `port = await Server(engine).start()`."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Start the engine loop and listen; the bound port (port 0 picks a free one)."""
        self.engine.start()
        self.runner = web.AppRunner(create_app(self.engine), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1] if sockets else self.port
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)


def run(engine: Engine, host: str = "127.0.0.1", port: int = 8000, ready: Any = None) -> None:
    """Serve until interrupted (Ctrl-C): `rawformer serve`; `ready(port)` is called once listening."""

    async def main() -> None:
        server = Server(engine, host, port)
        bound = await server.start()
        if ready is not None:
            ready(bound)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
