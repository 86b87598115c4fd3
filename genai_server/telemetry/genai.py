"""The OpenTelemetry GenAI semantic conventions' vocabulary, shared by the Prometheus histograms and the spans."""

from __future__ import annotations

# gen_ai.provider.name by backend: the engine or API that answered.
PROVIDERS = {"onnx": "onnxruntime_genai", "openai": "openai", "ollama": "ollama"}


def provider_name(backend: str | None) -> str:
    """``gen_ai.provider.name`` for a backend (``unknown`` where no backend took the request)."""
    if not backend:
        return "unknown"
    return PROVIDERS.get(backend, backend)


def error_type(status: int) -> str:
    """``error.type``: the HTTP status of a request that failed (499: the client left), empty otherwise (an empty
    label is an absent one to PromQL)."""
    return str(status) if status >= 400 else ""
