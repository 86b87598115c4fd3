"""genai_server: an OpenAI-compatible server for ONNX Runtime GenAI models, built on aiohttp.

The package is built in floors; a module imports modules of its own floor or of the floors below it, never above,
and no import circle exists anywhere (imports under ``TYPE_CHECKING`` included). ``tests/test_layers.py`` keeps
this rule.

7. ``__main__``, ``app``: start-up, and the one place that puts the floors together (``create_app``).
6. ``http``: the endpoint table, the handlers, the middlewares, SSE, the lifecycle (probes, drain), OpenAPI.
5. ``serving``: the serving layer, which knows nothing of HTTP: model ids to backends, limits, the request's clock;
   ``apis``: the other wire APIs (Responses, Anthropic Messages) translated to and from chat, with the responses kept.
4. ``backends``: the ``Backend`` protocol and its adapters: the embedded engine, and relaying to engines elsewhere.
3. ``telemetry``: the request's clock and record, Prometheus, traces, GPU memory; it knows nothing of the web app.
2. ``embedded``: the ONNX Runtime GenAI engine on its owner thread, and what it needs; it knows nothing of the API.
1. ``protocol``, ``errors``, ``settings``, ``logs``, ``exit_status``, ``shown_urls``: the wire models, typed errors,
   settings read once, logging, exit statuses, URLs as they may be shown.
"""

__version__ = "0.1.0"
