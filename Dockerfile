# syntax=docker/dockerfile:1
# LangOrch's image: every service (`langorch serve gateway|compiler|runtime|approvals|triggers`, what
# deploy/k8s runs) and the CLI. Multi-stage: uv installs the locked dependencies and the workspace into a virtual
# environment, which the runtime stage copies, without uv, compilers or sources. It runs as uid/gid 10001 and
# writes nothing outside /tmp (the manifests mount the root file system read-only).
#   docker build -t langorch:0.1.0 .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
RUN pip install --no-cache-dir "uv==0.13.9"
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/langorch
WORKDIR /src
# the dependencies first: this layer is rebuilt only when the lock file or a member's pyproject.toml changes
COPY pyproject.toml uv.lock README.md ./
COPY libs/ckp-core/pyproject.toml libs/ckp-core/
COPY libs/langorch-infra/pyproject.toml libs/langorch-infra/
COPY services/compiler/pyproject.toml services/compiler/
COPY services/runtime/pyproject.toml services/runtime/
COPY services/gateway/pyproject.toml services/gateway/
COPY services/approvals/pyproject.toml services/approvals/
COPY services/triggers/pyproject.toml services/triggers/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace
# then LangOrch itself, installed as packages (not editable: the runtime stage has no sources)
COPY libs libs
COPY services services
COPY src src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

FROM python:${PYTHON_VERSION}-slim-bookworm
RUN groupadd --gid 10001 langorch \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin langorch
COPY --from=build /opt/langorch /opt/langorch
ENV PATH=/opt/langorch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
WORKDIR /tmp
# the gateway's API (LANGORCH_PORT) and the other services' /metrics, /health, /ready (LANGORCH_METRICS_PORT)
EXPOSE 8080 9464
ENTRYPOINT ["langorch"]
CMD ["serve", "gateway"]
