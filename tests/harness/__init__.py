"""The suite's one test harness: everything a test module shares with another lives here, and no test module imports
another (``tests/test_suite_layout.py`` checks it), so moving or deleting a test never breaks an unrelated one.

- ``waiting``: ``eventually`` and ``eventually_async``, the only way a test waits for something to happen: they poll
  the observable (a gauge, a counter, a log line, a file) until it holds, and fail with a clear message once a
  generous limit passes. A fixed ``sleep`` before an assertion is a flake on a loaded box; polling is not.
- ``process``: ``ServerProcess``, ``python -m genai_server`` (or another command) as a real process on a real port,
  its settings as environment variables and its log in a file; plus ``free_port``, ``server_env`` and
  ``wait_healthy`` for the few callers (the benchmarks) that start a process their own way.
- ``upstream``: the scripted engines a gateway relays to: ``ScriptedUpstream`` (an OpenAI-style engine that answers
  each model name with its script), ``AppInThread`` (an app served from a thread, for a server that is another
  process), and the pieces scripts are built from (``sse``, ``chunk``, ``USAGE``, ``ndjson``, ``OLLAMA_CHAT``).
- ``bodies``: the request bodies tests send to the bundled model (``chat_body``, ``long_stream``, ``MODEL_ID``,
  ``LONG_PROMPT``).
- ``responses``: readers of what comes back (``sse_events``, ``stream_chunks``, ``metric_sample``,
  ``assert_same_greedy_text``).
- ``in_process``: the app in the test's own process (``make_settings``, the ``ClientFactory`` type of the
  ``make_client`` fixture).
- ``openai_spec``: the official OpenAI API description kept in the repository, and a validator for its schemas.

The fixtures built on these are in ``tests/conftest.py``.
"""
