FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY worker worker
RUN pip install --no-cache-dir .
USER nobody
# /metrics, /healthz and /readyz when SMTP_WORKER_HTTP is 0.0.0.0:9464 (the default serves
# 127.0.0.1 only, which a container's health check reaches and nothing outside does).
EXPOSE 9464
CMD ["smtp-worker", "run"]
