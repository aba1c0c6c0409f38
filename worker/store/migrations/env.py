"""Alembic environment: runs on the connection `worker.store.migrate` hands over."""

from __future__ import annotations

from alembic import context

from worker.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `smtp-worker migrate`")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
context.run_migrations()
