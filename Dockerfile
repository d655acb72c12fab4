# syntax=docker/dockerfile:1
# Step-Audio-EditX voice-cloning studio: GPU image.
#
#   docker build -t step-audio-studio .
#   docker run --gpus all -p 127.0.0.1:7860:7860 -v "$PWD/models:/app/models:ro" -v studio-cache:/app/cache step-audio-studio
#
# Base: CUDA 13.0 to match torch 2.13.0 from PyPI (a CUDA 13.0 build). The "base" flavour is enough:
# torch and onnxruntime-gpu[cuda,cudnn] bring cuBLAS, cuDNN and the other CUDA libraries as pip wheels,
# so the larger runtime/cudnn flavours would only duplicate them. The image's NVIDIA_REQUIRE_CUDA makes
# the NVIDIA container toolkit refuse a host driver older than CUDA 13.0 needs (R580+).
# Ubuntu 22.04 because its python3.11 is the interpreter the project is tested on (24.04 ships 3.12).
# What was verified without a Docker engine: docs/operations.md, "Container image".
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu22.04

# ---------------------------------------------------------------- build stage: the virtualenv
FROM ${CUDA_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Distribution packages are not version-pinned: the base image tag fixes the Ubuntu release and its
# security updates should flow in on rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install pip==26.3
# Only the requirements file first, so code changes do not reinstall the dependencies (pyworld compiles).
COPY requirements-gpu.txt /tmp/requirements-gpu.txt
RUN /opt/venv/bin/python -m pip install -r /tmp/requirements-gpu.txt

# ---------------------------------------------------------------- runtime stage
FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="step-audio-studio" \
      org.opencontainers.image.description="Step-Audio-EditX voice-cloning studio (Gradio UI + HTTP API)"
ARG DEBIAN_FRONTEND=noninteractive
# ffmpeg: the page's streaming player converts audio chunks with it (without it results show when whole).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ffmpeg \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin studio
COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# The code is owned by root and read-only to the studio user; only the cache and data volumes are
# writable. What users make (voices: the SQLite database of userdata/) lives in /app/data, never in the cache.
COPY . /app
RUN mkdir -p /app/cache /app/models /app/data \
    && chown 1000:1000 /app/cache /app/models /app/data
VOLUME ["/app/cache", "/app/models", "/app/data"]

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 \
    STUDIO_HOST=0.0.0.0 \
    STUDIO_PORT=7860 \
    STUDIO_CACHE_DIR=/app/cache \
    STUDIO_MODEL_ROOT=/app/models \
    STUDIO_DATA_DIR=/app/data \
    STUDIO_ENGINE=step-audio
USER 1000:1000
EXPOSE 7860

# Liveness only (GET /healthz); load balancers should route on GET /readyz. No curl in the image:
# urlopen raises on a refused connection or an HTTP error status, which makes python exit non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('STUDIO_PORT', '7860') + '/healthz', timeout=4)"]

# STUDIO_ENGINE=step-audio (above): an incomplete /app/models stops the container with the missing
# files named, instead of serving the CPU preview; /readyz is 503 whenever the engine serving is not
# the configured one. Set STUDIO_ENGINE=preview (or auto) to run the image without the models.
CMD ["python", "app.py"]
