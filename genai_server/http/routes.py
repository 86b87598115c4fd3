"""The endpoint table and the API's thin handlers: parse the request, call the serving layer, write JSON or SSE.

Every route the server answers is declared once, in ``endpoint_table``; the middlewares, the API-key check and the
OpenAPI document read it from there.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from genai_server.apis.messages import CountTokensRequest, MessagesRequest, error_body
from genai_server.apis.responses import ResponsesRequest
from genai_server.http.app_keys import METRICS, SERVING
from genai_server.http.endpoints import Endpoint
from genai_server.http.handling import json_response, parse_body, respond, start_clock, timing_headers
from genai_server.http.lifecycle import health, live, ready
from genai_server.http.messages_api import count_tokens, create_message
from genai_server.http.openapi import openapi
from genai_server.http.playground import asset, load, page
from genai_server.http.request_state import BODY, KEY_OWNER
from genai_server.http.responses_api import create_response, delete_response, get_response
from genai_server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingsRequest,
    ModelAction,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``."""
    return json_response(request.app[SERVING].list_models())


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model_id}``."""
    return json_response(request.app[SERVING].get_model(request.match_info["model_id"]))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    stats = start_clock(request)
    body = parse_body(request, ChatCompletionRequest)
    owner = request.get(KEY_OWNER, "")  # whose KV caches it may continue
    return await respond(request, stats, body, await request.app[SERVING].chat(body, stats, owner))


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    stats = start_clock(request)
    body = parse_body(request, CompletionRequest)
    owner = request.get(KEY_OWNER, "")
    return await respond(request, stats, body, await request.app[SERVING].complete(body, stats, owner))


async def load_model(request: web.Request) -> web.Response:
    """``POST /models/load``: a MODELS_DIR model loaded now (waits for the load)."""
    await request.app[SERVING].load_model(ModelAction.model_validate(request[BODY]).model)
    return json_response({"success": True})


async def unload_model(request: web.Request) -> web.Response:
    """``POST /models/unload``: a MODELS_DIR model unloaded now, unless it is generating."""
    await request.app[SERVING].unload_model(ModelAction.model_validate(request[BODY]).model)
    return json_response({"success": True})


async def tokenize(request: web.Request) -> web.Response:
    """``POST /tokenize`` (vLLM's and llama-server's shapes)."""
    return json_response(await request.app[SERVING].tokenize(TokenizeRequest.model_validate(request[BODY])))


async def detokenize(request: web.Request) -> web.Response:
    """``POST /detokenize``."""
    return json_response(await request.app[SERVING].detokenize(DetokenizeRequest.model_validate(request[BODY])))


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: relayed to an engine that serves them; the embedded engine says it does not."""
    stats = start_clock(request)
    EmbeddingsRequest.model_validate(request[BODY])  # its shape checked; relayed as the client sent it
    answer = json_response(await request.app[SERVING].embeddings(request[BODY], stats))
    answer.headers.update(timing_headers(stats))
    return answer


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format, gauges read now."""
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def endpoint_table(*, metrics_public: bool, ui: bool = True) -> tuple[Endpoint, ...]:
    """Every route of the server, once. ``metrics_public``: whether /metrics (and /load, the same gauges) is answered
    without an API key; ``ui``: whether the playground is served."""
    return (
        *_playground(ui),
        Endpoint("GET", "/load", load, "the gauges, as JSON", public=metrics_public, documented=False),
        Endpoint(
            "POST",
            "/v1/chat/completions",
            chat_completions,
            "the completion (JSON), or with stream=true an SSE stream",
            operation="chat",
            request_model=ChatCompletionRequest,
            response_model=ChatCompletion,
        ),
        Endpoint(
            "POST",
            "/v1/completions",
            completions,
            "the completion (JSON), or with stream=true an SSE stream",
            operation="text_completion",
            request_model=CompletionRequest,
            response_model=Completion,
        ),
        Endpoint(
            "POST",
            "/v1/responses",
            create_response,
            "the response (JSON), or with stream=true its events (SSE); kept for previous_response_id unless store "
            "is false",
            operation="chat",
            request_model=ResponsesRequest,
        ),
        Endpoint("GET", "/v1/responses/{response_id}", get_response, "a kept response"),
        Endpoint("DELETE", "/v1/responses/{response_id}", delete_response, "forget a kept response"),
        Endpoint(
            "POST",
            "/v1/messages",
            create_message,
            "Anthropic's Messages API: the message (JSON), or with stream=true its events (SSE)",
            operation="chat",
            request_model=MessagesRequest,
            error_body=error_body,
        ),
        Endpoint(
            "POST",
            "/v1/messages/count_tokens",
            count_tokens,
            "the tokens a Messages request's prompt holds",
            request_model=CountTokensRequest,
            tokenizes=True,
            error_body=error_body,
        ),
        Endpoint(
            "POST",
            "/v1/embeddings",
            embeddings,
            "embeddings, from an engine that serves them",
            operation="embeddings",
            request_model=EmbeddingsRequest,
        ),
        Endpoint(
            "POST",
            "/tokenize",
            tokenize,
            "token ids",
            request_model=TokenizeRequest,
            response_model=TokenizeResponse,
            tokenizes=True,
        ),
        Endpoint(
            "POST",
            "/detokenize",
            detokenize,
            "text",
            request_model=DetokenizeRequest,
            response_model=DetokenizeResponse,
            tokenizes=True,
        ),
        Endpoint(
            "POST", "/models/load", load_model, "load a MODELS_DIR model now", request_model=ModelAction, admin=True
        ),
        Endpoint(
            "POST",
            "/models/unload",
            unload_model,
            "unload a MODELS_DIR model now",
            request_model=ModelAction,
            admin=True,
        ),
        Endpoint("GET", "/v1/models", list_models, "every model", response_model=ModelList),
        Endpoint("GET", "/v1/models/{model_id:.+}", get_model, "one model", response_model=ModelCard),
        Endpoint("GET", "/health", health, "the model is loaded", public=True),
        Endpoint("GET", "/health/live", live, "the process answers", public=True),
        Endpoint("GET", "/health/ready", ready, "serving", public=True, unavailable=True),
        Endpoint("GET", "/openapi.json", openapi, "this description", public=True, documented=False),
        Endpoint("GET", "/metrics", metrics, "Prometheus metrics", public=metrics_public, documented=False),
    )


def _playground(ui: bool) -> tuple[Endpoint, ...]:
    """The page and its files: public (they hold no data; every call the page makes needs the key the server
    wants), and absent with ``--no-ui``."""
    if not ui:
        return ()
    return (
        Endpoint("GET", "/", page, "the playground", public=True, documented=False),
        Endpoint("GET", "/ui/{name}", asset, "the playground's script and style", public=True, documented=False),
    )
