# One image for every Tuneforge role: `tuneforge serve` (api), `tuneforge worker`, `tuneforge migrate`.
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
# wandb, mlflow and tensorboard integrations.
COPY pyproject.toml README.md ./
RUN mkdir tuneforge && touch tuneforge/__init__.py \
    && pip install torch==2.13.0 \
    && pip install ".[tracking]" \
    && pip uninstall -y tuneforge
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
