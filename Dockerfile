# vlm-inference: one uvicorn process per GPU. CUDA-capable: PyPI's torch wheels for Linux bundle the CUDA
# runtime, so `docker run --gpus all` uses the host's GPU and the same image runs on the CPU without one.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Build-time only (never persisted): a wheel folder to install from instead of PyPI (CI uses the
# machine's local torch wheels), and an optional CA bundle for a TLS-intercepting proxy (a build secret).
ARG PIP_FIND_LINKS=""
ARG PIP_NO_INDEX=""
ARG APP_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/root \
    HF_HOME=/root/.cache/huggingface \
    APP_UID=${APP_UID} \
    JOBS_DB=/app/jobs/jobs.sqlite3 \
    LOG_FORMAT=json \
    HOST=0.0.0.0 \
    PORT=8002

# The service user owns the model cache; a host folder mounted there (./docker-volumes/base-model in the
# documented commands) is handed to it at start by the entrypoint, whoever owned it.
RUN useradd --uid "${APP_UID}" --home-dir /root --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /root/.cache/huggingface /app/models/weights /app/jobs \
    && chown -R app:app /root/.cache /app/models /app/jobs \
    && chmod 755 /root

# Fonts for SVG uploads: resvg draws a diagram's labels with the system's fonts (DejaVu covers Latin and
# Cyrillic); without any, an SVG with text is refused rather than read with its labels missing.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-dejavu-core=2.37-6 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first: this layer is reused until requirements.txt changes.
COPY requirements.txt .
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir -r requirements.txt

COPY deploy/entrypoint.sh /usr/local/bin/vlm-entrypoint
COPY app ./app

# No USER: the entrypoint starts as root to make the mounted cache writable, then drops to APP_UID with setpriv
# (no capabilities, no new privileges) before the service starts.
EXPOSE 8002
# Start period: the first start may download the model (~4.5 GB) before it can be healthy.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os,sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8002'), timeout=8).status == 200 else 1)"]
# One worker: one process owns the GPU. SIGTERM drains in-flight requests (SHUTDOWN_GRACE_S) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/vlm-entrypoint"]
CMD ["python3", "-m", "app"]
