"""The store: tables, queries and migrations; SQLite and PostgreSQL through one code path."""

from worker.store.db import Store, translate_error
from worker.store.migrate import migrate

__all__ = ["Store", "migrate", "translate_error"]
