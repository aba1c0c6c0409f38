"""A typed shortcut per command: its `data` fields as keyword arguments, its reply typed.

    reply = await client.ticket_new(auth, channel="ops", ticket={"title": "Disk full", "body": ""})
    if reply.status == "success":
        reply.data.sid                      # SuccessReply[TicketCreated]

An optional field left out is not sent (UNSET), which is not the same as sending null: for
`settings_email_update`, `description=None` clears the description. Nested objects (`options`,
`ticket`, `hit`) are mappings or `schemas` models. A success reply that does not match its
command's model raises BadReply, so `reply.data` is what its type says.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, cast

import pydantic
from pydantic import BaseModel

from schemas import ErrorReply, OwnerAuth, Reply, SuccessReply, UserAuth, parse_reply
from schemas import settings as s
from schemas import tickets as t
from worker.client.errors import BadReply

D = TypeVar("D", bound=BaseModel)
Owner = OwnerAuth | Mapping[str, Any]
User = UserAuth | Mapping[str, Any]
Object = BaseModel | Mapping[str, Any]


class Unset(enum.Enum):
    UNSET = "UNSET"


UNSET = Unset.UNSET
"""The default of every optional field: left out of `data`."""


def _plain(value: Any) -> Any:
    """`value` as JSON-ready data; models give the fields that were set, by their wire names."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _data(**fields: Any) -> dict[str, Any]:
    return {key.rstrip("_"): value for key, value in fields.items() if value is not UNSET}


class Commands:
    """The typed shortcuts, over a command's body and its reply's parsing; `Client` supplies
    `_request`, which carries the bytes."""

    async def _request(self, type_: str, body: bytes, message_id: str, timeout: float) -> bytes:
        """The reply's bytes to the command `body`, routed by `type_`."""
        raise NotImplementedError

    async def _call(
        self,
        type_: str,
        auth: Any,
        data: Any,
        message_id: str | None,
        timeout: float,
        *,
        lenient: bool,
    ) -> Reply:
        body: dict[str, Any] = {"type": type_, "auth": _plain(auth)}
        if data is not None:
            body["data"] = _plain(data)
        raw = await self._request(
            type_, json.dumps(body).encode(), message_id or uuid.uuid4().hex, timeout
        )
        try:
            return parse_reply(type_, raw, lenient=lenient)
        except pydantic.ValidationError as exc:
            raise BadReply(f"the reply to {type_} does not match the contract") from exc

    async def _typed(
        self,
        type_: str,
        reply: type[D],
        auth: Any,
        data: dict[str, Any],
        message_id: str | None,
        timeout: float,
    ) -> SuccessReply[D] | ErrorReply:
        answer = await self._call(type_, auth, data, message_id, timeout, lenient=False)
        assert isinstance(answer, ErrorReply) or isinstance(answer.data, reply)
        return cast("SuccessReply[D] | ErrorReply", answer)

    # --- email settings -------------------------------------------------------------------------

    async def settings_email_create(
        self,
        auth: Owner,
        *,
        domain: str,
        from_: str,
        options: Object,
        provider: str = "smtp",
        description: str | Unset | None = UNSET,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[s.EmailSettings] | ErrorReply:
        data = _data(
            domain=domain, provider=provider, description=description, from_=from_, options=options
        )
        return await self._typed(
            "settings.email.create", s.EmailSettings, auth, data, message_id, timeout
        )

    async def settings_email_get(
        self, auth: Owner, *, domain: str, message_id: str | None = None, timeout: float = 30
    ) -> SuccessReply[s.EmailSettings] | ErrorReply:
        data = _data(domain=domain)
        return await self._typed(
            "settings.email.get", s.EmailSettings, auth, data, message_id, timeout
        )

    async def settings_email_update(
        self,
        auth: Owner,
        *,
        domain: str,
        provider: str | Unset = UNSET,
        description: str | Unset | None = UNSET,
        from_: str | Unset = UNSET,
        options: Object | Unset = UNSET,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[s.EmailSettings] | ErrorReply:
        data = _data(
            domain=domain, provider=provider, description=description, from_=from_, options=options
        )
        return await self._typed(
            "settings.email.update", s.EmailSettings, auth, data, message_id, timeout
        )

    async def settings_email_delete(
        self, auth: Owner, *, domain: str, message_id: str | None = None, timeout: float = 30
    ) -> SuccessReply[s.Removed] | ErrorReply:
        data = _data(domain=domain)
        return await self._typed(
            "settings.email.delete", s.Removed, auth, data, message_id, timeout
        )

    async def settings_email_test(
        self, auth: Owner, *, domain: str, message_id: str | None = None, timeout: float = 30
    ) -> SuccessReply[s.EmailTestResult] | ErrorReply:
        data = _data(domain=domain)
        return await self._typed(
            "settings.email.test", s.EmailTestResult, auth, data, message_id, timeout
        )

    # --- SMTP users -----------------------------------------------------------------------------

    async def settings_smtp_user_add(
        self,
        auth: Owner,
        *,
        total_limit: int,
        hourly_limit: int,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[s.SmtpUserCreated] | ErrorReply:
        data = _data(total_limit=total_limit, hourly_limit=hourly_limit)
        return await self._typed(
            "settings.smtp_user.add", s.SmtpUserCreated, auth, data, message_id, timeout
        )

    async def settings_smtp_user_edit(
        self,
        auth: Owner,
        *,
        smtp_user_name: str,
        total_limit: int | Unset | None = UNSET,
        hourly_limit: int | Unset | None = UNSET,
        status: s.UserStatus | Unset | None = UNSET,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[s.SmtpUser] | ErrorReply:
        data = _data(
            smtp_user_name=smtp_user_name,
            total_limit=total_limit,
            hourly_limit=hourly_limit,
            status=status,
        )
        return await self._typed(
            "settings.smtp_user.edit", s.SmtpUser, auth, data, message_id, timeout
        )

    async def settings_smtp_user_reset_password(
        self,
        auth: Owner,
        *,
        smtp_user_name: str,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[s.SmtpUserPassword] | ErrorReply:
        data = _data(smtp_user_name=smtp_user_name)
        return await self._typed(
            "settings.smtp_user.reset_password", s.SmtpUserPassword, auth, data, message_id, timeout
        )

    async def settings_smtp_user_list(
        self, auth: Owner, *, message_id: str | None = None, timeout: float = 30
    ) -> SuccessReply[s.SmtpUserList] | ErrorReply:
        return await self._typed(
            "settings.smtp_user.list", s.SmtpUserList, auth, {}, message_id, timeout
        )

    async def settings_smtp_user_delete(
        self,
        auth: Owner,
        *,
        smtp_user_name: str,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[s.Removed] | ErrorReply:
        data = _data(smtp_user_name=smtp_user_name)
        return await self._typed(
            "settings.smtp_user.delete", s.Removed, auth, data, message_id, timeout
        )

    # --- channels -------------------------------------------------------------------------------

    async def settings_channel_put(
        self,
        auth: Owner,
        *,
        name: str,
        domain: str,
        recipients: Sequence[str],
        subject_prefix: str | Unset | None = UNSET,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[s.Channel] | ErrorReply:
        data = _data(
            name=name, domain=domain, recipients=list(recipients), subject_prefix=subject_prefix
        )
        return await self._typed("settings.channel.put", s.Channel, auth, data, message_id, timeout)

    async def settings_channel_get(
        self, auth: Owner, *, name: str, message_id: str | None = None, timeout: float = 30
    ) -> SuccessReply[s.Channel] | ErrorReply:
        data = _data(name=name)
        return await self._typed("settings.channel.get", s.Channel, auth, data, message_id, timeout)

    async def settings_channel_list(
        self, auth: Owner, *, message_id: str | None = None, timeout: float = 30
    ) -> SuccessReply[s.ChannelList] | ErrorReply:
        return await self._typed(
            "settings.channel.list", s.ChannelList, auth, {}, message_id, timeout
        )

    async def settings_channel_delete(
        self, auth: Owner, *, name: str, message_id: str | None = None, timeout: float = 30
    ) -> SuccessReply[s.Removed] | ErrorReply:
        data = _data(name=name)
        return await self._typed(
            "settings.channel.delete", s.Removed, auth, data, message_id, timeout
        )

    # --- tickets --------------------------------------------------------------------------------

    async def ticket_new(
        self,
        auth: User,
        *,
        channel: str,
        ticket: Object,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[t.TicketCreated] | ErrorReply:
        data = _data(channel=channel, ticket=ticket)
        return await self._typed("ticket.new", t.TicketCreated, auth, data, message_id, timeout)

    async def ticket_get(
        self, auth: User, *, sid: str, message_id: str | None = None, timeout: float = 30
    ) -> SuccessReply[t.TicketOne] | ErrorReply:
        data = _data(sid=sid)
        return await self._typed("ticket.get", t.TicketOne, auth, data, message_id, timeout)

    async def ticket_get_many(
        self,
        auth: User,
        *,
        sids: Sequence[str],
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[t.TicketMany] | ErrorReply:
        data = _data(sids=list(sids))
        return await self._typed("ticket.get_many", t.TicketMany, auth, data, message_id, timeout)

    async def ticket_close(
        self,
        auth: User,
        *,
        sid: str,
        comment: str | Unset | None = UNSET,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[t.Done] | ErrorReply:
        data = _data(sid=sid, comment=comment)
        return await self._typed("ticket.close", t.Done, auth, data, message_id, timeout)

    async def ticket_close_many(
        self,
        auth: User,
        *,
        sids: Sequence[str],
        comment: str | Unset | None = UNSET,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[t.Done] | ErrorReply:
        data = _data(sids=list(sids), comment=comment)
        return await self._typed("ticket.close_many", t.Done, auth, data, message_id, timeout)

    async def ticket_ack(
        self, auth: User, *, sid: str, message_id: str | None = None, timeout: float = 30
    ) -> SuccessReply[t.Done] | ErrorReply:
        data = _data(sid=sid)
        return await self._typed("ticket.ack", t.Done, auth, data, message_id, timeout)

    async def ticket_ack_many(
        self,
        auth: User,
        *,
        sids: Sequence[str],
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[t.Done] | ErrorReply:
        data = _data(sids=list(sids))
        return await self._typed("ticket.ack_many", t.Done, auth, data, message_id, timeout)

    async def ticket_unack(
        self, auth: User, *, sid: str, message_id: str | None = None, timeout: float = 30
    ) -> SuccessReply[t.Done] | ErrorReply:
        data = _data(sid=sid)
        return await self._typed("ticket.unack", t.Done, auth, data, message_id, timeout)

    async def ticket_unack_many(
        self,
        auth: User,
        *,
        sids: Sequence[str],
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[t.Done] | ErrorReply:
        data = _data(sids=list(sids))
        return await self._typed("ticket.unack_many", t.Done, auth, data, message_id, timeout)

    # --- hits -----------------------------------------------------------------------------------

    async def hit_new(
        self,
        auth: User,
        *,
        sid: str,
        hit: Object,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[t.HitCreated] | ErrorReply:
        data = _data(sid=sid, hit=hit)
        return await self._typed("hit.new", t.HitCreated, auth, data, message_id, timeout)

    async def hit_list(
        self,
        auth: User,
        *,
        sid: str,
        after_seq: int | Unset = UNSET,
        limit: int | Unset = UNSET,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> SuccessReply[t.HitPage] | ErrorReply:
        data = _data(sid=sid, after_seq=after_seq, limit=limit)
        return await self._typed("hit.list", t.HitPage, auth, data, message_id, timeout)
