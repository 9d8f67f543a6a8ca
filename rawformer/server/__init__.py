"""rawformer.server: an OpenAI-compatible HTTP server (aiohttp) over the continuous-batching Engine.

    from rawformer.runtime.engine import Engine
    from rawformer.server import run
    run(Engine(model, tokenizer, name="my-model"), host="127.0.0.1", port=8000)   # `rawformer serve`

aiohttp is imported here only: `pip install aiohttp` (the "serve" extra) to use it.
"""

try:
    import aiohttp  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "rawformer.server needs aiohttp: pip install 'rawformer[serve]' (or pip install aiohttp)"
    ) from exc

from rawformer.server.app import Server, create_app, run
from rawformer.server.protocol import BadRequest, chat_prompt, parse_chat, parse_completion

__all__ = ["BadRequest", "Server", "chat_prompt", "create_app", "parse_chat", "parse_completion", "run"]
