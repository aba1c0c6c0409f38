"""The store: the only place with SQL. Tables, migrations, and one module per aggregate:

`owners`, `settings` (email settings), `users` (SMTP users, their logins and quotas), `channels`,
`tickets` (and their hits), `emails` (claimed under a lease to send), `idempotency`. Their
functions take a connection in a transaction (`Store.transaction`) and return rows or models.
SQLite and PostgreSQL go through one code path; `hot` runs the statements every command runs
straight on asyncpg or aiosqlite, as SQLAlchemy compiled them.
"""

from worker.store.db import Connection, Row, Store, display_url, ping, translate_error
from worker.store.hot import Savepoints
from worker.store.migrate import migrate

__all__ = [
    "Connection",
    "Row",
    "Savepoints",
    "Store",
    "display_url",
    "migrate",
    "ping",
    "translate_error",
]
