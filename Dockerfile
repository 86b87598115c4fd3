# genai_server on the CPU. Python 3.11+: onnxruntime-genai 0.18 has no wheel for 3.10.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SERVER_HOST=0.0.0.0 \
    SERVER_PORT=8000 \
    LOG_FORMAT=json

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY genai_server ./genai_server

RUN useradd --system --uid 10001 --no-create-home genai
USER genai

EXPOSE 8000
# Mount a model folder and set MODEL_PATH to serve it; without one the bundled demo model (noise) is served.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('SERVER_PORT', '8000'), timeout=4)"
# SIGTERM drains: in-flight streams get SHUTDOWN_TIMEOUT (30 s) to finish, so stop with a longer grace:
# docker stop -t 40 (docker's default is 10 s).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "genai_server"]
