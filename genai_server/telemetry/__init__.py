"""What the server measures and where it reports it: each request's clock, the finished-request record, Prometheus,
OpenTelemetry traces, the GenAI vocabulary they share, and GPU memory (NVML). Nothing here knows of the web app."""
