# headwise for GPU nodes. Build:  docker build -t headwise .
# Run:  docker run --gpus all -p 8000:8000 -v /path/to/model:/models:ro headwise
# Every `headwise serve` flag is an environment variable: -e HEADWISE_MAX_QUEUE=128 ...
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.txt pyproject.toml README.md ./
# runtime packages only (no test or plotting tools), at the versions pinned in requirements.txt
RUN pip install --no-cache-dir -c requirements.txt torch triton transformers tokenizers sentencepiece \
    safetensors gguf numpy scipy tqdm fastapi uvicorn pydantic prometheus-client httpx
COPY engine engine
COPY kvcache kvcache
COPY kernels kernels
COPY server server
COPY clients clients
COPY synthetic synthetic
COPY profilers profilers
COPY loadtest loadtest
RUN pip install --no-cache-dir --no-deps .

FROM ${CUDA_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 headwise
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HEADWISE_HOST=0.0.0.0 \
    HEADWISE_PORT=8000 \
    HEADWISE_MODEL=/models \
    HEADWISE_DEVICE=cuda \
    HEADWISE_DTYPE=bfloat16 \
    HEADWISE_CACHE=/home/headwise/.cache/headwise
USER headwise
WORKDIR /home/headwise
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HEADWISE_PORT', '8000') + '/health', timeout=4)"
ENTRYPOINT ["headwise", "serve"]
