"""Business rules per command family; `make_router` joins their handlers for the consumers."""

from worker.handlers import settings, tickets
from worker.handlers.base import Context, Router, RouterMismatch, Spec


def make_router() -> Router:
    """Every command's handler."""
    return Router(settings.router, tickets.router)


__all__ = ["Context", "Router", "RouterMismatch", "Spec", "make_router"]
