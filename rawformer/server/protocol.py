"""OpenAI-compatible request parsing and response bodies (no I/O here: the app does that).

Accepted fields
---------------
/v1/completions:      model, prompt (a str, a list of token ids, or a list of one of those), max_tokens
                      (default 16), temperature (default 1.0; 0 = greedy), top_p, n (1 only), stream, stop
                      (a str or a list of up to 4), seed, user; extensions: top_k, repetition_penalty,
                      ignore_eos, return_token_ids (the choice then carries "token_ids")
/v1/chat/completions: the same with messages = [{"role": "system" | "user" | "assistant", "content": str}]
                      instead of prompt, and max_completion_tokens as an alias of max_tokens
Refused with 400 (a JSON error body naming the parameter): unknown types or ranges, n > 1, echo, logprobs,
best_of > 1, non-zero presence / frequency penalties, logit_bias, tools; unknown fields are ignored.

Chat prompts: the tokenizer's own template when it has one (`apply_chat_template(messages) -> str`), else the
plain fallback (documented and stable):

    <role>: <content>\\n   for every message, then   assistant:
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BadRequest", "ParsedRequest", "chat_prompt", "parse_chat", "parse_completion"]

FINISH = {
    "stop_token": "stop",
    "stop_string": "stop",
    "length": "length",
    "max_len": "length",
    "abort": "abort",
    "error": "error",
}


class BadRequest(ValueError):
    """A request the API refuses (400), with the offending parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(str(self), "invalid_request_error", self.param)


def error_body(message: str, kind: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ParsedRequest:
    prompt: Any  # a str or a list of token ids
    kwargs: dict[str, Any] = field(default_factory=dict)  # Engine.add_request keyword arguments
    stream: bool = False
    model: str | None = None
    return_token_ids: bool = False
    chat: bool = False


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"{name} must be a number, got {v!r}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise BadRequest(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}", name)
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{name} must be an integer, got {v!r}", name)
    if v < lo or (hi is not None and v > hi):
        raise BadRequest(f"{name} must be >= {lo}{f' and <= {hi}' if hi is not None else ''}, got {v}", name)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"{name} must be true or false, got {v!r}", name)
    return v


def _common(body: Any, max_tokens_limit: int) -> tuple[dict[str, Any], bool, bool]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name in ("echo", "logprobs", "top_logprobs", "logit_bias", "tools", "functions", "suffix"):
        v = body.get(name)
        if v not in (None, False, 0, {}, []):
            raise BadRequest(f"{name} is not supported", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise BadRequest(f"{name} is not supported (use repetition_penalty)", name)
    if _int(body, "n", 1, 1) != 1 or _int(body, "best_of", 1, 1) != 1:
        raise BadRequest("only n = 1 (and best_of = 1) is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 16, 1, max_tokens_limit)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("stop must be a non-empty string or a list of at most 4 of them", "stop")
    kwargs = dict(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", 0, 0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        seed=_int(body, "seed", None, 0, 2**63 - 1),
        stop=stop,
        ignore_eos=_bool(body, "ignore_eos"),
    )
    return kwargs, _bool(body, "stream"), _bool(body, "return_token_ids")


def parse_completion(body: Any, max_tokens_limit: int = 1 << 20) -> ParsedRequest:
    """Check a /v1/completions body; raise BadRequest (400) naming the field."""
    kwargs, stream, ids = _common(body, max_tokens_limit)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt is empty", "prompt")
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        if min(prompt) < 0:
            raise BadRequest("prompt token ids must be >= 0", "prompt")
    else:
        raise BadRequest(
            "prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt"
        )
    model = body.get("model")
    return ParsedRequest(prompt, kwargs, stream, model if isinstance(model, str) else None, ids)


def chat_prompt(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The prompt text of chat messages: the tokenizer's template, else the plain fallback."""
    apply = getattr(tokenizer, "apply_chat_template", None)
    if callable(apply):
        return apply(messages)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def parse_chat(body: Any, tokenizer: Any, max_tokens_limit: int = 1 << 20) -> ParsedRequest:
    """Check a /v1/chat/completions body; the prompt is the rendered conversation."""
    kwargs, stream, ids = _common(body, max_tokens_limit)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(
                f"messages[{i}] needs a role of system, user, assistant or developer", "messages"
            )
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}]: only text content is supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
        clean.append({"role": m["role"], "content": content})
    model = body.get("model")
    name = model if isinstance(model, str) else None
    return ParsedRequest(chat_prompt(clean, tokenizer), kwargs, stream, name, ids, chat=True)


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return dict(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )  # fmt: skip


def response_body(req: ParsedRequest, rid: str, model: str, out: Any) -> dict[str, Any]:
    """The non-streaming response of a finished RequestOutput."""
    finish = FINISH.get(out.finish_reason or "", out.finish_reason)
    if req.chat:
        choice: dict[str, Any] = {
            "index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": finish,
            "logprobs": None,
        }  # fmt: skip
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": out.text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    if req.return_token_ids:
        choice["token_ids"] = list(out.token_ids)
    return {
        "id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
        "usage": usage(out.prompt_tokens, len(out.token_ids)),
    }  # fmt: skip


def chunk_body(req: ParsedRequest, rid: str, model: str, out: Any, first: bool) -> dict[str, Any]:
    """One SSE chunk of a streamed response."""
    finish = FINISH.get(out.finish_reason or "", out.finish_reason) if out.finished else None
    if req.chat:
        delta: dict[str, Any] = {"content": out.new_text}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": out.new_text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    if req.return_token_ids:
        choice["token_ids"] = list(out.new_token_ids)
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    if out.finished:
        body["usage"] = usage(out.prompt_tokens, len(out.token_ids))
    return body
