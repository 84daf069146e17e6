# syntax=docker/dockerfile:1
# The API image: FastAPI under uvicorn with Redis/RQ clients, and nothing else. It installs
# the [api] extra only (no [worker] extra): no torch, no diffusers, no model weights. The
# same image runs the webhook deliverer (`diffq webhooks`, see docker-compose.yml).
#
#   docker build -f docker/api.Dockerfile -t diffq-api .        # from the repository root

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# app/ only: worker/ and model/ (torch code, 22 MB of weights) stay out of this image.
COPY pyproject.toml README.md ./
COPY app ./app
# diffq/app links to ../app (one import name, diffq.app; diffq/worker and diffq/model dangle here and are skipped)
COPY diffq ./diffq
RUN python -m venv /opt/diffq \
 && /opt/diffq/bin/pip install --no-cache-dir --disable-pip-version-check ".[api]" \
 && /opt/diffq/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 diffq \
 && useradd --system --uid 10001 --gid diffq --create-home --home-dir /home/diffq --shell /usr/sbin/nologin diffq \
 && install -d -o diffq -g diffq /results
COPY --from=build /opt/diffq /opt/diffq
ENV PATH=/opt/diffq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DIFFQ_HOST=0.0.0.0 \
    DIFFQ_PORT=8000
USER 10001:10001
WORKDIR /home/diffq
EXPOSE 8000
# No curl in a slim image: the healthcheck is Python's own urllib (a non-2xx answer raises).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DIFFQ_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["diffq"]
CMD ["api"]
