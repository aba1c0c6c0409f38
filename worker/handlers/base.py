"""What every handler gets (a Context) and how commands find their handler (a Router).

Handlers take a Context and validated data, and return a pydantic model: the reply's `data`.
They raise CommandError subclasses to refuse. They never see AMQP or raw JSON; what they want
published (events, emails to deliver) they add to the Context, and the consumer publishes it
once the transaction has committed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from schemas.envelope import OwnerAuth, UserAuth
from worker.config import Settings
from worker.errors import AuthenticationError, Forbidden
from worker.events import Effect, event
from worker.jobs import DeliveryJob
from worker.security import Keyring
from worker.store import Connection, owners, users

AuthKind = Literal["owner", "user"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent the command: an owner, or one of its SMTP users."""

    owner_id: str
    user: str | None = None


@dataclass(slots=True)
class Context:
    conn: Connection
    principal: Principal
    now: datetime
    keyring: Keyring
    settings: Settings
    effects: list[Effect] = field(default_factory=list)
    # Steps that take a contended row lock (a user's quota counters) run last, right before
    # COMMIT, so concurrent commands of one user hold that lock as briefly as possible.
    last: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def owner_id(self) -> str:
        return self.principal.owner_id

    def emit(self, type_: str, data: Any) -> None:
        self.effects.append(event(type_, self.owner_id, self.now, data))

    def deliver(self, email_id: str, domain: str) -> None:
        job = DeliveryJob(email_id=email_id, owner_id=self.owner_id, domain=domain)
        self.effects.append(Effect("delivery", "", job.dump()))

    def run_last(self, step: Callable[[], Awaitable[None]]) -> None:
        self.last.append(step)

    async def finish(self) -> None:
        for step in self.last:
            await step()


M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Context, Any], Awaitable[BaseModel]]
Finish = Callable[[Any], Awaitable[BaseModel]]
_H = TypeVar("_H", bound=Callable[[Context, Any], Awaitable[Any]])


@dataclass(frozen=True, slots=True)
class Spec:
    type: str
    auth: AuthKind
    handler: Handler
    # A handler with slow I/O (a relay probe) returns what `finish` needs. The command consumer
    # runs the handler (authentication, checks) and queues the command on P.probes; the probe
    # consumer runs the handler again, then `finish` after its transaction, so neither a command
    # slot nor a store connection is held across the network (worker.probes).
    finish: Finish | None = None
    # Its reply holds a secret (a new password): its idempotency record is stored encrypted.
    secret: bool = False


class RouterMismatch(ValueError):
    """The handlers are not those of the contract's commands: the worker must not start."""


class Router:
    """The handler of each command type. Each family of handlers has its own, filled by its
    `command` decorators; the worker is given one Router that joins them."""

    def __init__(self, *routers: Router) -> None:
        self.specs: dict[str, Spec] = {}
        for router in routers:
            for spec in router.specs.values():
                self.add(spec)

    def add(self, spec: Spec) -> None:
        if spec.type in self.specs:
            raise RouterMismatch(f"two handlers for {spec.type}")
        self.specs[spec.type] = spec

    def command(
        self, type_: str, auth: AuthKind, *, finish: Finish | None = None, secret: bool = False
    ) -> Callable[[_H], _H]:
        def register(handler: _H) -> _H:
            self.add(Spec(type_, auth, handler, finish, secret))
            return handler

        return register

    def get(self, type_: str) -> Spec | None:
        return self.specs.get(type_)

    def __getitem__(self, type_: str) -> Spec:
        return self.specs[type_]

    def check(self, types: Iterable[str]) -> None:
        """RouterMismatch unless there is exactly one handler for each of `types`."""
        wanted = set(types)
        missing, extra = sorted(wanted - set(self.specs)), sorted(set(self.specs) - wanted)
        if missing or extra:
            raise RouterMismatch(
                "the handlers do not match the contract's commands:"
                + (f" no handler for {', '.join(missing)};" if missing else "")
                + (f" handlers for unknown commands {', '.join(extra)};" if extra else "")
            )


class _Recent:
    """The values of the `size` keys used last: the least recently used goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key: str, value: str) -> None:
        self._values[key] = value
        self._values.move_to_end(key)
        if len(self._values) > self.size:
            self._values.popitem(last=False)


# An owner's token never changes (there is no command to rotate it), so its hash is read once,
# and kept while the owner is among the last OWNERS_CACHED to send a command: a worker's memory
# does not grow with the number of owners in the store.
# SMTP user passwords are not cached: a reset must stop the old password at once, everywhere.
OWNERS_CACHED = 10_000
_OWNER_TOKEN_HASHES = _Recent(OWNERS_CACHED)


async def authenticate(
    conn: Connection,
    keyring: Keyring,
    kind: AuthKind,
    auth: OwnerAuth | UserAuth,
    logins: Mapping[str, users.Login] | None = None,
) -> Principal:
    """The principal behind `auth`, or AuthenticationError with one message for every cause.

    `logins`: the SMTP users' logins as this transaction already read them (`users.logins`), by
    name; a name missing there is no user. Without them, the user's login is read now."""
    if kind == "owner":
        assert isinstance(auth, OwnerAuth)
        token_hash = _OWNER_TOKEN_HASHES.get(auth.owner_id)
        if token_hash is None:
            token_hash = await owners.token_hash(conn, auth.owner_id)
            if token_hash is not None:
                _OWNER_TOKEN_HASHES.put(auth.owner_id, token_hash)
        # Hash even when the owner is missing, so both cases cost the same.
        if not keyring.verify(auth.token, token_hash or "") or token_hash is None:
            raise AuthenticationError()
        return Principal(auth.owner_id)
    assert isinstance(auth, UserAuth)
    user = logins.get(auth.login) if logins is not None else await users.login(conn, auth.login)
    if not keyring.verify(auth.password, user.password_hash if user else "") or user is None:
        raise AuthenticationError()
    if user.status != "Enable":
        raise Forbidden("the SMTP user is disabled")
    return Principal(user.owner_id, auth.login)
