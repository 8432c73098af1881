# One image for both services, CPU or CUDA by build argument:
#   docker build -t qkvcomm:cpu  --build-arg TORCH_VARIANT=cpu .
#   docker build -t qkvcomm:cuda --build-arg TORCH_VARIANT=cu128 .
# The CUDA wheels of torch carry their own CUDA runtime; the host needs the NVIDIA driver and
# the NVIDIA container toolkit. The install and build-time steps are the scripts in
# deploy/docker/, which `make image-smoke` replays in a fresh virtualenv (no Docker engine needed).

# Stage 1: the wheels: the light client (its build hook generates the gRPC stubs into it) and the
# services over it.
FROM python:3.11-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY proto ./proto
COPY clients/python ./clients/python
COPY qkv_core ./qkv_core
COPY service_common ./service_common
COPY sender_service ./sender_service
COPY receiver_service ./receiver_service
COPY qkvcomm_cli ./qkvcomm_cli
RUN pip wheel --no-deps --wheel-dir /dist ./clients/python .

# Stage 2: the runtime, installed from that wheel at the versions in constraints.txt.
FROM python:3.11-slim
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    QKVCOMM_HOST=0.0.0.0 \
    QKVCOMM_CACHE_DIR=/home/qkv/.cache/qkvcomm \
    HF_HOME=/home/qkv/.cache/huggingface

RUN useradd --create-home --uid 10001 qkv
COPY constraints.txt deploy/docker/install.sh deploy/docker/build-steps.sh /opt/qkvcomm/
COPY --from=wheel /dist /opt/qkvcomm/dist
RUN TORCH_INDEX="https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    sh /opt/qkvcomm/install.sh /opt/qkvcomm/dist /opt/qkvcomm/constraints.txt

USER 10001
WORKDIR /home/qkv
RUN sh /opt/qkvcomm/build-steps.sh

EXPOSE 50061 50062 9461 9462
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "qkvcomm health --address 127.0.0.1:${QKVCOMM_PORT:-50061}"]
ENTRYPOINT ["qkvcomm"]
CMD ["serve-receiver"]
