# One image for every Tuneforge role: `tuneforge serve` (api), `worker`, `beat`, `inference`, `migrate`.
# GPU workers need the NVIDIA container runtime; torch 2.13.0's Linux wheels from PyPI bundle CUDA.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    TUNEFORGE_DATA_DIR=/var/lib/tuneforge

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, so code changes do not reinstall torch; the tracking extra is for workers'
# wandb, mlflow and tensorboard integrations, the gguf extra for GGUF exports (llama-cpp-python
# compiles llama.cpp here, with the Makefile's GGUF_CMAKE_ARGS; tests/deploy checks they agree).
ARG GGUF_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF"
COPY pyproject.toml README.md ./
RUN mkdir tuneforge && touch tuneforge/__init__.py \
    && pip install torch==2.13.0 \
    && CMAKE_ARGS="$GGUF_CMAKE_ARGS" pip install ".[tracking,gguf]" \
    && pip uninstall -y tuneforge
# llama.cpp's converter, out of the sdist of the llama-cpp-python just installed, into
# /usr/local/share/tuneforge/llama.cpp (the script needs only the standard library).
COPY tuneforge/training/gguf.py /tmp/gguf.py
RUN python /tmp/gguf.py install-converter && rm /tmp/gguf.py
COPY tuneforge ./tuneforge
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 tuneforge \
    && mkdir -p /var/lib/tuneforge \
    && chown tuneforge /var/lib/tuneforge

USER tuneforge
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
ENTRYPOINT ["tuneforge"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
