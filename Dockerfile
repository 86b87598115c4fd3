# genai_server on the CPU. Python 3.11+: onnxruntime-genai 0.18 has no wheel for 3.10.
# Build: docker build -t genai-server:0.1.0 .   (tag it with the package's version, as etc/kubernetes.yaml names it)
# 3.11: the interpreter .ci/run tests the suite on (tox covers 3.12 and 3.13 too).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SERVER_HOST=0.0.0.0 \
    SERVER_PORT=8000 \
    LOG_FORMAT=json

# The dependencies first, in a layer of their own that code changes do not rebuild.
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
# Then the package itself (the bundled demo model is package data), built and installed as pip installs it anywhere.
COPY pyproject.toml README.md requirements.txt /src/
COPY genai_server /src/genai_server
RUN pip install --no-deps /src && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home genai
USER genai

EXPOSE 8000
# Mount a model folder and set MODEL_PATH to serve it; without one the bundled demo model (noise) is served.
# The check uses the image's own Python: the slim base has no curl or wget.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('SERVER_PORT', '8000'), timeout=4)"]
# SIGTERM drains: in-flight streams get SHUTDOWN_TIMEOUT (30 s) to finish, so stop with a longer grace:
# docker stop -t 40 (docker's default is 10 s).
STOPSIGNAL SIGTERM
CMD ["genai-server"]
