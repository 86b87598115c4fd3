"""genai_server: an OpenAI-compatible server for ONNX Runtime GenAI models, built on aiohttp."""

__version__ = "0.1.0"
