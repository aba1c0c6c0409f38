FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY worker worker
RUN pip install --no-cache-dir .
USER nobody
CMD ["smtp-worker", "run"]
