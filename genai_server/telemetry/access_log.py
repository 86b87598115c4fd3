"""The access log: one structured line per finished request, from its record; and, with LOG_PROMPTS on (only then),
the prompt and completion on a logger of their own."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from genai_server.telemetry.record import RequestRecord

log = logging.getLogger("genai_server.access")
# Prompts and completions go to their own logger, silent unless LOG_PROMPTS is on.
prompts_log = logging.getLogger("genai_server.prompts")

# A client's model id is logged up to this many characters: enough for any real id, bounded for a hostile one.
_MODEL_CHARS = 256


def log_request(record: RequestRecord) -> None:
    """The request's access line: who, what, how it ended, and for a generation request its tokens and times."""
    fields: dict[str, object] = {
        "request_id": record.request_id,
        "method": record.method,
        "path": record.path,
        "status": record.status,
        "duration_ms": round(record.duration_s * 1000, 2),
    }
    if record.error_code is not None:
        fields.update(code=record.error_code, param=record.error_param)
    if record.generates:
        # The model that served it, or, for a request refused before any did, the one it asked for.
        requested = record.requested_model[:_MODEL_CHARS] if record.requested_model is not None else None
        fields["model"] = record.model or requested
    figures = record.figures
    if figures is not None:
        fields.update(
            prompt_tokens=figures.prompt_tokens,
            cached_prompt_tokens=figures.cached_prompt_tokens,
            completion_tokens=figures.completion_tokens,
            queue_time_ms=figures.queue_time_ms,
            ttft_ms=figures.time_to_first_token_ms,
            tpot_ms=figures.time_per_output_token_ms,
            e2e_ms=figures.e2e_latency_ms,
            inference_time_ms=figures.generation_time_ms,
        )
    log.info("%s %s %s", record.method, record.path, record.status, extra={"fields": fields})


def log_exchange(request_id: str | None, body: BaseModel, result: BaseModel | dict[str, Any] | None) -> None:
    """With LOG_PROMPTS on (and only then): the prompt and, when not streamed, the completion."""
    answer = result.model_dump() if isinstance(result, BaseModel) else result
    prompt = body.model_dump(include={"messages", "prompt"})
    completion = [
        choice.get("message", choice).get("content", choice.get("text")) for choice in (answer or {}).get("choices", [])
    ] or None
    prompts_log.info(
        "prompt and completion",
        extra={"fields": {"request_id": request_id, **prompt, "completion": completion}},
    )
