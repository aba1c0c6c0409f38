"""Business rules per command family. Importing this package registers every handler."""

from worker.handlers import settings  # noqa: F401 - registers the settings commands
from worker.handlers.base import REGISTRY, Context, Spec

__all__ = ["REGISTRY", "Context", "Spec"]
