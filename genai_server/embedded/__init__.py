"""The embedded ONNX Runtime GenAI engine: its owner thread, the batch scheduler, prefix reuse, detokenizing,
logprobs, stop strings, the tool-call grammar and the runtime's privacy switch. Nothing here knows of HTTP or of
the OpenAI API: ``backends/onnx.py`` turns requests into its token ids and options."""
