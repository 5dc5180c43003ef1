# syntax=docker/dockerfile:1
#
# EdgePress images. Two targets from one file:
#
#   docker build --target api    -t edgepress-api:0.1.0 .
#   docker build --target worker -t edgepress-worker:0.1.0 .
#
# - `api` carries the base dependencies only: no torch, no onnxruntime (the API validates
#   recipes by importing the pass registry, which keeps heavy imports inside `run`).
# - `worker` adds the `worker` extra, with torch taken from the CPU wheel index: the PyPI
#   wheel for Linux is the CUDA build (several GB) and the workers run on CPUs.
# - Both run as an unprivileged user (uid 10001) and work with a read-only root filesystem:
#   the only writable paths are /tmp and the Prometheus multiprocess directory, which the
#   Kubernetes manifests mount as emptyDir volumes (k8s/base).
#
# Versions: the base image is pinned to a patch release (pin it by digest as well in a
# registry that mirrors it: `python:3.11.14-slim-bookworm@sha256:...`); every direct
# dependency is pinned with `==` to the versions the test suite runs against, and `pip check`
# fails the build when pyproject.toml gains a dependency that is not pinned here.

FROM python:3.11.14-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A fixed numeric uid/gid so that Kubernetes' runAsNonRoot can verify it without a passwd
# lookup and so that files in volumes have a predictable owner.
RUN groupadd --system --gid 10001 edgepress \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin edgepress


# ---------------------------------------------------------------------------------------
# Build stage for the API environment: a virtualenv that is copied whole into the runtime
# stage, so no build tooling (pip caches, setuptools) ends up in the final image layers.
FROM base AS build-api

RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir pip==26.3 setuptools==84.2.1 wheel==0.45.1

# Base dependencies of pyproject.toml, pinned (see the header).
RUN pip install --no-cache-dir \
        flask==3.1.3 \
        gunicorn==27.0.1 \
        pydantic==2.14.4 \
        pydantic-settings==2.16.3 \
        boto3==1.44.8 \
        prometheus-client==0.26.0 \
        "celery[redis]==5.7.0" \
        redis==8.1.0 \
        onnx==1.23.2 \
        numpy==2.4.6 \
        requests==2.34.2

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# --no-deps: everything is pinned above; `pip check` proves the pins cover pyproject.toml.
RUN pip install --no-cache-dir --no-deps . && pip check


# ---------------------------------------------------------------------------------------
# Build stage for the worker environment: the API environment plus the `worker` extra.
FROM build-api AS build-worker

# The CPU build of torch first, from its own index, so that the `worker` extra's
# torch==2.13.0 is already satisfied (2.13.0+cpu matches ==2.13.0) and nothing pulls CUDA.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir \
        onnxruntime==1.31.1 \
        onnxscript==0.7.2 \
        scikit-learn==1.9.1 \
        zstandard==0.25.0 \
        ml-dtypes==0.6.0 \
    && pip check


# ---------------------------------------------------------------------------------------
# Runtime settings shared by both images.
FROM base AS runtime

# Where prometheus-client keeps its per-process files under gunicorn / Celery prefork. It
# must be writable and empty at start: in Kubernetes an emptyDir is mounted over it; for a
# plain `docker run --read-only`, mount a tmpfs there (--tmpfs /run/edgepress).
ENV PROMETHEUS_MULTIPROC_DIR=/run/edgepress/metrics \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp

RUN mkdir -p /run/edgepress/metrics && chown -R 10001:10001 /run/edgepress

# The gunicorn command line names its config by path (service/api/gunicorn_conf.py), so
# the source tree lives in the working directory too; it is the same tree that was
# installed into the virtualenv.
WORKDIR /app


# ---------------------------------------------------------------------------------------
FROM runtime AS api

COPY --from=build-api /opt/venv /opt/venv
COPY --chown=root:root service /app/service

ENV EDGEPRESS_BIND=0.0.0.0:8080
EXPOSE 8080
USER 10001:10001

# Liveness only (the process answers HTTP); readiness with store and broker checks is
# /readyz, used by Kubernetes, not by Docker's healthcheck.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

CMD ["gunicorn", "-c", "service/api/gunicorn_conf.py", "service.api:create_app()"]


# ---------------------------------------------------------------------------------------
FROM runtime AS worker

COPY --from=build-worker /opt/venv /opt/venv
COPY --chown=root:root service /app/service

# Soft/hard limits of one job, seconds. The Kubernetes worker Deployment sets its
# terminationGracePeriodSeconds from the hard limit (k8s/base/worker-deployment.yaml).
ENV EDGEPRESS_WORKER_METRICS_PORT=9808 \
    EDGEPRESS_JOB_SOFT_TIME_LIMIT=1800 \
    EDGEPRESS_JOB_TIME_LIMIT=1900
EXPOSE 9808
USER 10001:10001

# The worker serves its own Prometheus endpoint; if that thread answers, the process is up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9808/metrics', timeout=4)"]

CMD ["celery", "-A", "service.worker.entry", "worker", "--loglevel=INFO", "--concurrency=1", \
     "--prefetch-multiplier=1", "-Q", "edgepress.jobs"]
