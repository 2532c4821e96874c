# loraserve on a CUDA machine: the Unsloth backend, served by `loraserve serve`.
#   docker build -t loraserve .
#   docker run --gpus all -p 8000:8000 -v /models:/models:ro -v /adapters:/adapters:ro \
#     -v loraserve-compiled:/home/loraserve/.cache/compiled \
#     -e LORASERVE_BASE_MODEL=/models/llama-3-8b -e LORASERVE_ADAPTER_ROOT=/adapters \
#     -e LORASERVE_ADMIN_TOKEN=change-me loraserve
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/loraserve \
    PATH=/opt/loraserve/bin:$PATH \
    HF_HOME=/home/loraserve/.cache/huggingface

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential curl \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv $VIRTUAL_ENV
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY training ./training
COPY server ./server
COPY loraserve ./loraserve
# torch first, from the CUDA 12.8 wheel index, so the unsloth extra does not pick another build.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 \
 && pip install ".[unsloth]"

RUN useradd --create-home --uid 10001 loraserve
USER loraserve
WORKDIR /home/loraserve

# The kernels compiled at start-up (TorchInductor's fused norm/RoPE/activation, our Triton kernels) are cached
# here: mount a volume on it and a restarted container reuses them instead of compiling again.
ENV LORASERVE_HOST=0.0.0.0 \
    LORASERVE_PORT=8000 \
    TRITON_CACHE_DIR=/home/loraserve/.cache/compiled/triton \
    TORCHINDUCTOR_CACHE_DIR=/home/loraserve/.cache/compiled/inductor
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["loraserve", "serve"]
