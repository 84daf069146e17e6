# syntax=docker/dockerfile:1
# The worker image: a CUDA build of torch (pinned, like the Makefile's TORCH), diffq with the
# [worker] extra, and the bundled shapes model (package data of `model`), so a worker serves
# something out of the box. Real checkpoints are mounted at /models and chosen with
# DIFFQ_MODEL_PATH (see docker-compose.yml and docs/deployment.md's "Containers" section).
#
#   docker build -f docker/worker.Dockerfile -t diffq-worker .                      # CUDA 13.0
#   docker build -f docker/worker.Dockerfile -t diffq-worker:cu126 \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04 --build-arg TORCH_INDEX=cu126 .
#   docker build -f docker/worker.Dockerfile -t diffq-worker:cpu \
#     --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg TORCH_INDEX=cpu .             # no GPU
#
# torch 2.13's CUDA builds are cu126 and cu130 (cu132 experimental); there is no cu128 build.
# The CUDA libraries (cudart, cuBLAS, cuDNN, NCCL) come with torch as pip packages, so the
# CUDA image's small "base" flavour is enough: it sets what the NVIDIA container toolkit needs
# (and NVIDIA_REQUIRE_CUDA, which refuses a too-old host driver with a clear message); the
# "runtime"/"cudnn-runtime" flavours would add a second copy of the same libraries.

ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=cu130
# Ubuntu's python3 (3.12 on 24.04); a venv keeps pip away from the system's packages (PEP 668).
# Unpinned apt versions on purpose: the base image pins the release, and pinning Ubuntu's
# package revisions breaks the build every time the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/diffq \
 && /opt/diffq/bin/pip install --no-cache-dir --disable-pip-version-check \
      --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY model ./model
# diffq/{app,worker,model} link to the three folders: the installed package is diffq.app, diffq.worker, diffq.model
COPY diffq ./diffq
# torch is already there, so pip keeps that build; the check fails the build if it did not.
RUN /opt/diffq/bin/pip install --no-cache-dir --disable-pip-version-check ".[worker]" \
 && /opt/diffq/bin/python -c "import sys, torch; v = torch.__version__; sys.exit(v.split('+')[0] != '${TORCH_VERSION}' and 'torch ' + v)" \
 && /opt/diffq/bin/python -c "from diffq.app.settings import default_model_path as p; assert (p() / 'model_index.json').is_file(), p()"

FROM ${BASE_IMAGE}
# Unpinned apt versions, as above; python3 (the venv comes from the build stage), and the two libraries
# OpenCV loads (the invisible watermark, DIFFQ_WATERMARK_PAYLOAD).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 diffq \
 && useradd --system --uid 10001 --gid diffq --create-home --home-dir /home/diffq --shell /usr/sbin/nologin diffq \
 && mkdir /models \
 && install -d -o diffq -g diffq /results
COPY --from=build /opt/diffq /opt/diffq
ENV PATH=/opt/diffq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1
# Mount real checkpoints (diffusers folders) here, read-only, and set DIFFQ_MODEL_PATH=/models/<name>.
# Unset, the worker serves the bundled shapes model from the installed package.
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/diffq
# SIGTERM: the worker finishes its running job within DIFFQ_SHUTDOWN_GRACE, else hands it back
# to the queue; give the container longer than that to stop (docker stop -t / stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["diffq"]
CMD ["worker"]
