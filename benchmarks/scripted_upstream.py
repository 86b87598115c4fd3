"""An OpenAI-compatible upstream that computes nothing: what ``proxy_overhead.py --model scripted`` puts behind
the gateway to measure the gateway's own cost, without an engine competing with it for the cores.

Each streamed ``/v1/completions`` (or ``/v1/chat/completions``) sends the completion (or chat) chunks an engine
would (one per token, ``max_tokens`` of them), then the usage chunk when asked and ``[DONE]``, as fast as the socket
takes them, or one every SECONDS_PER_TOKEN, at most SLOTS requests at a time with the rest waiting, as an engine's
batch limit makes them (``replica_balance.py`` makes replicas of different speeds that way).

    python benchmarks/scripted_upstream.py PORT [SECONDS_PER_TOKEN [SLOTS]]
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

MODEL = "scripted"
PACE = web.AppKey("pace", float)
SLOTS = web.AppKey("slots", asyncio.Semaphore)


def _chunk(text: str, finish: str | None = None, *, chat: bool = False) -> bytes:
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body = {"id": "cmpl-scripted", "object": _OBJECT[chat], "created": 0, "model": MODEL, "choices": [choice]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


_OBJECT = {False: "text_completion", True: "chat.completion.chunk"}


async def completions(request: web.Request) -> web.StreamResponse:
    async with request.app[SLOTS]:
        return await _stream(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    async with request.app[SLOTS]:
        return await _stream(request, chat=True)


async def _stream(request: web.Request, *, chat: bool) -> web.StreamResponse:
    body = await request.json()
    tokens = int(body.get("max_tokens") or 16)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    pace = request.app[PACE]
    for i in range(tokens):
        if pace:
            await asyncio.sleep(pace)
        await response.write(_chunk(f" w{i}", "length" if i == tokens - 1 else None, chat=chat))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
        payload = {"id": "cmpl-scripted", "object": _OBJECT[chat], "created": 0, "model": MODEL, "choices": []}
        await response.write(b"data: " + json.dumps({**payload, "usage": usage}).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]})


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    app = web.Application()
    app[PACE] = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    app[SLOTS] = asyncio.Semaphore(int(sys.argv[3]) if len(sys.argv) > 3 else 1 << 20)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
