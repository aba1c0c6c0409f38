"""Business rules per command family. Importing this package registers every handler."""

from worker.handlers import settings, tickets  # noqa: F401 - registers their commands
from worker.handlers.base import REGISTRY, Context, Spec

__all__ = ["REGISTRY", "Context", "Spec"]
