"""`rawformer serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse

from rawformer.commands._model import add_model_args, engine_args, load_model, make_engine

EPILOG = """endpoints:
  POST /v1/completions        {"prompt": "...", "max_tokens": 32, "temperature": 0, "stream": false}
  POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], "stream": true}
  GET  /v1/models, /health, /metrics (Prometheus)

examples:
  rawformer serve --model ckpt/ --port 8000
  rawformer serve --random gpt2-tiny-bytes --adaptive latency --target-ms 20
  curl -s localhost:8000/v1/completions -d '{"prompt": "Hello", "max_tokens": 16}'

The server listens on 127.0.0.1 unless --host says otherwise (0.0.0.0 exposes it to the network: there is no
authentication). When more than --max-queue requests wait, new ones get 429; a client that disconnects
cancels its request."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server", epilog=EPILOG,
        description="Serves a model over HTTP with continuous batching, streaming (SSE) and metrics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_model_args(p)
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)")
    n.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    n.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    n.add_argument("--name", default=None, help="model name in the API (default: the file / preset name)")
    engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rawformer.server import run as serve

    model, tok, name = load_model(args)
    engine = make_engine(args, model, tok, args.name or name, max_queue=args.max_queue)

    def ready(port: int) -> None:
        print(f"serving {engine.name} on http://{args.host}:{port} (Ctrl-C stops)", flush=True)

    serve(engine, args.host, args.port, ready=ready)
    return 0
