"""The OpenTelemetry GenAI semantic conventions' vocabulary, shared by the Prometheus histograms and the spans."""

from __future__ import annotations

# A request's sampling parameters (as the record names them) and their gen_ai.request.* attributes.
REQUEST_ATTRIBUTES = {
    "max_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "seed": "gen_ai.request.seed",
    "n": "gen_ai.request.choice.count",
}
# gen_ai.provider.name by backend: the engine or API that answered.
PROVIDERS = {"onnx": "onnxruntime_genai", "openai": "openai", "ollama": "ollama"}


def provider_name(backend: str) -> str:
    """``gen_ai.provider.name`` for a backend."""
    return PROVIDERS.get(backend, backend)


def error_type(status: int) -> str:
    """``error.type``: the HTTP status of a request that failed (499: the client left), empty otherwise (an empty
    label is an absent one to PromQL)."""
    return str(status) if status >= 400 else ""
