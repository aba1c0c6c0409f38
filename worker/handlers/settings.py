"""Settings commands: email settings per domain, SMTP users, channels (contract section 6)."""

from __future__ import annotations

import secrets
from typing import Any

from schemas import settings as s
from schemas._types import distinct_addresses
from worker.errors import Conflict, NotFound, ValidationError
from worker.handlers.base import Context, Router
from worker.mail.policy import is_allowed, literal_address
from worker.mail.relay import Relay, probe, relay_of
from worker.security import new_id, new_token
from worker.store import Row, channels, users
from worker.store import settings as email_settings
from worker.store.settings import Lock

router = Router()


def _found(row: Row[Any] | None, what: str, key: str) -> Row[Any]:
    """`row`, unless there is none: then NotFound, naming the `what` asked for by its `key`."""
    if row is None:
        raise NotFound(what, [key])
    return row


# --- email settings -----------------------------------------------------------------------------


def _settings_out(row: Any) -> s.EmailSettings:
    options = row.options
    auth = s.RelayAuthOut(user=options["auth_user"]) if options.get("auth_user") else None
    return s.EmailSettings(
        id=row.id,
        domain=row.domain,
        provider=row.provider,
        description=row.description,
        from_=row.sender,
        options=s.SmtpOptionsOut(
            host=options["host"],
            port=options["port"],
            secure=options["secure"],
            starttls=options["starttls"],
            debug=options["debug"],
            tls=s.TlsOptions(rejectUnauthorized=options["rejectUnauthorized"]),
            auth=auth,
            timeout=options["timeout"],
        ),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _stored_options(options: s.SmtpOptions) -> dict[str, Any]:
    """The relay options as stored: everything but the password, which is kept encrypted."""
    return {
        "host": options.host,
        "port": options.port,
        "secure": options.secure,
        "starttls": options.starttls,
        "debug": options.debug,
        "rejectUnauthorized": options.tls.rejectUnauthorized,
        "timeout": options.timeout,
        "auth_user": options.auth.user if options.auth else None,
    }


async def _own_settings(ctx: Context, domain: str, lock: Lock = None) -> Row[Any]:
    """The owner's settings of `domain`; `lock` takes its row lock (PostgreSQL; SQLite has one
    writer at a time anyway) until the transaction ends."""
    row = await email_settings.own(ctx.conn, ctx.owner_id, domain, lock)
    return _found(row, "email settings", domain)


def _check_host(ctx: Context, host: str) -> None:
    """Refuses an IP address the relay address policy denies, in any spelling a resolver takes.

    Host names are checked when the worker connects, against every address they resolve to.
    """
    address = literal_address(host)
    if address is not None and not is_allowed(address, ctx.settings.relay_allow):
        raise ValidationError(
            "invalid settings",
            [
                {
                    "loc": ["data", "options", "host"],
                    "msg": "the address is not allowed: a relay must be at a public address",
                }
            ],
        )


@router.command("settings.email.create", "owner")
async def create_email_settings(ctx: Context, data: s.EmailSettingsCreate) -> s.EmailSettings:
    _check_host(ctx, data.options.host)
    if await email_settings.domain_taken(ctx.conn, data.domain):
        raise Conflict(f"the domain {data.domain} is already configured")
    auth = data.options.auth
    values = {
        "id": new_id(),
        "owner_id": ctx.owner_id,
        "domain": data.domain,
        "provider": data.provider,
        "description": data.description,
        "sender": data.from_,
        "options": _stored_options(data.options),
        "auth_pass_enc": ctx.keyring.encrypt(auth.pass_) if auth else None,
        "created_at": ctx.now,
        "updated_at": ctx.now,
    }
    await email_settings.add(ctx.conn, values)
    out = _settings_out(Written(values))
    ctx.emit("email_settings.created", out)
    return out


@router.command("settings.email.get", "owner")
async def get_email_settings(ctx: Context, data: s.DomainRef) -> s.EmailSettings:
    return _settings_out(await _own_settings(ctx, data.domain))


def _null(*loc: str) -> ValidationError:
    # Located from the command body, as the schema's own errors are: ["data", "options", ...].
    return ValidationError("invalid settings", [{"loc": ["data", *loc], "msg": "must not be null"}])


def _merge_options(
    ctx: Context, stored: dict[str, Any], pass_enc: str | None, patch: s.SmtpOptionsPatch
) -> tuple[dict[str, Any], str | None]:
    """The stored options (and encrypted password) with `patch` applied key by key."""
    options = dict(stored)
    for key in patch.model_fields_set - {"auth"}:
        value = getattr(patch, key)
        if value is None:
            raise _null("options", key)
        if key == "tls":
            options["rejectUnauthorized"] = value.rejectUnauthorized
        else:
            options[key] = value
    if "auth" in patch.model_fields_set:
        if patch.auth is None:
            options["auth_user"], pass_enc = None, None
        else:
            user = patch.auth.user or options.get("auth_user")
            if patch.auth.pass_ is not None:
                pass_enc = ctx.keyring.encrypt(patch.auth.pass_)
            missing = [f for f, v in (("user", user), ("pass", pass_enc)) if v is None]
            if missing:
                raise ValidationError(
                    "relay login needs a user and a password",
                    [
                        {"loc": ["data", "options", "auth", f], "msg": "Field required"}
                        for f in missing
                    ],
                )
            options["auth_user"] = user
    return options, pass_enc


@router.command("settings.email.update", "owner")
async def update_email_settings(ctx: Context, data: s.EmailSettingsUpdate) -> s.EmailSettings:
    row = await _own_settings(ctx, data.domain)
    given = data.model_fields_set
    options, pass_enc = row.options, row.auth_pass_enc
    if "options" in given:
        if data.options is None:
            raise _null("options")
        if data.options.host is not None:
            _check_host(ctx, data.options.host)
        options, pass_enc = _merge_options(ctx, options, pass_enc, data.options)
    values: dict[str, Any] = {"options": options, "auth_pass_enc": pass_enc, "updated_at": ctx.now}
    for field, column in (
        ("provider", "provider"),
        ("description", "description"),
        ("from_", "sender"),
    ):
        if field in given:
            value = getattr(data, field)
            if value is None and field != "description":
                raise _null(field.rstrip("_"))
            values[column] = value
    await email_settings.change(ctx.conn, row.id, values)
    out = _settings_out(Written({**row._asdict(), **values}))
    ctx.emit("email_settings.updated", out)
    return out


@router.command("settings.email.delete", "owner")
async def delete_email_settings(ctx: Context, data: s.DomainRef) -> s.Removed:
    # Locked before the channels are read: a concurrent settings.channel.put of this domain
    # (which holds the lock shared) either commits first and is seen below, or waits and then
    # finds the settings gone.
    row = await _own_settings(ctx, data.domain, lock="update")
    names = await channels.names_on_domain(ctx.conn, ctx.owner_id, row.domain)
    if names:
        raise Conflict(f"channels still use the domain {row.domain}", {"channels": names})
    await email_settings.remove(ctx.conn, row.id)
    ctx.emit("email_settings.deleted", {"domain": data.domain})
    return s.Removed()


async def _probe(relay: Relay) -> s.EmailTestResult:
    result = await probe(relay)
    return s.EmailTestResult(ok=result.ok, stage=result.stage, message=result.message)


@router.command("settings.email.test", "owner", finish=_probe)
async def test_email_settings(ctx: Context, data: s.DomainRef) -> Relay:
    row = await _own_settings(ctx, data.domain)
    password = ctx.keyring.decrypt(row.auth_pass_enc) if row.auth_pass_enc else None
    return relay_of(row, password, ctx.settings.relay_allow)


class Written:
    """Attribute access over a dict, to render a row that was just written without reading it."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


# --- SMTP users ---------------------------------------------------------------------------------


def current_hour(ctx: Context) -> int:
    return int(ctx.now.timestamp()) // 3600


# The user object's fields a stored user has under the same names.
_USER_COLUMNS = ("status", "total_limit", "hourly_limit", "total_sent", "created_at")


def _user_out(row: Any, hour: int) -> s.SmtpUser:
    """The user object: never its password hash; `hourly_sent` counts the current hour only."""
    columns = {name: getattr(row, name) for name in _USER_COLUMNS}
    sent = row.hourly_sent if row.sent_hour == hour else 0
    return s.SmtpUser(smtp_user_name=row.name, hourly_sent=sent, **columns)


async def _own_user(ctx: Context, name: str) -> Row[Any]:
    return _found(await users.own(ctx.conn, ctx.owner_id, name), "SMTP user", name)


@router.command("settings.smtp_user.add", "owner", secret=True)
async def add_smtp_user(ctx: Context, data: s.SmtpUserAdd) -> s.SmtpUserCreated:
    name, password = f"smtp_{secrets.token_hex(8)}", new_token()
    await users.add(
        ctx.conn,
        {
            "name": name,
            "owner_id": ctx.owner_id,
            "password_hash": ctx.keyring.hash(password),
            "status": "Enable",
            "total_limit": data.total_limit,
            "hourly_limit": data.hourly_limit,
            "total_sent": 0,
            "hourly_sent": 0,
            "sent_hour": 0,
            "created_at": ctx.now,
        },
    )
    out = s.SmtpUserCreated(
        smtp_user_name=name,
        smtp_password=password,
        status="Enable",
        total_limit=data.total_limit,
        hourly_limit=data.hourly_limit,
    )
    ctx.emit("smtp_user.created", out.model_dump(mode="json", exclude={"smtp_password"}))
    return out


@router.command("settings.smtp_user.edit", "owner")
async def edit_smtp_user(ctx: Context, data: s.SmtpUserEdit) -> s.SmtpUser:
    row = await _own_user(ctx, data.smtp_user_name)
    values = {
        key: value
        for key in ("total_limit", "hourly_limit", "status")
        if (value := getattr(data, key)) is not None
    }
    if values:
        await users.change(ctx.conn, row.name, values)
    out = _user_out(Written({**row._asdict(), **values}), current_hour(ctx))
    ctx.emit("smtp_user.updated", out)
    return out


@router.command("settings.smtp_user.reset_password", "owner", secret=True)
async def reset_smtp_password(ctx: Context, data: s.SmtpUserRef) -> s.SmtpUserPassword:
    row = await _own_user(ctx, data.smtp_user_name)
    password = new_token()
    await users.change(ctx.conn, row.name, {"password_hash": ctx.keyring.hash(password)})
    ctx.emit("smtp_user.password_reset", {"smtp_user_name": row.name})
    return s.SmtpUserPassword(smtp_user_name=row.name, smtp_password=password)


@router.command("settings.smtp_user.list", "owner")
async def list_smtp_users(ctx: Context, data: s.Empty) -> s.SmtpUserList:
    rows = await users.of_owner(ctx.conn, ctx.owner_id)
    hour = current_hour(ctx)
    return s.SmtpUserList(smtp_list=[_user_out(row, hour) for row in rows])


@router.command("settings.smtp_user.delete", "owner")
async def delete_smtp_user(ctx: Context, data: s.SmtpUserRef) -> s.Removed:
    row = await _own_user(ctx, data.smtp_user_name)
    await users.remove(ctx.conn, row.name)
    ctx.emit("smtp_user.deleted", {"smtp_user_name": row.name})
    return s.Removed()


# --- channels -----------------------------------------------------------------------------------


def _channel_out(row: Any) -> s.Channel:
    return s.Channel(
        name=row.name,
        domain=row.domain,
        # A channel put before recipients were de-duplicated may still hold one twice.
        recipients=distinct_addresses(row.recipients),
        subject_prefix=row.subject_prefix,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def own_channel(ctx: Context, name: str) -> Row[Any]:
    return _found(await channels.own(ctx.conn, ctx.owner_id, name), "channel", name)


@router.command("settings.channel.put", "owner")
async def put_channel(ctx: Context, data: s.ChannelPut) -> s.Channel:
    await _own_settings(ctx, data.domain, lock="share")
    values = {
        "domain": data.domain,
        "recipients": data.recipients,
        "subject_prefix": (
            data.subject_prefix if data.subject_prefix is not None else f"[{data.name}]"
        ),
        "updated_at": ctx.now,
    }
    created_at = await channels.put(ctx.conn, ctx.owner_id, data.name, values, ctx.now)
    out = _channel_out(Written({"name": data.name, "created_at": created_at, **values}))
    ctx.emit("channel.updated", out)
    return out


@router.command("settings.channel.get", "owner")
async def get_channel(ctx: Context, data: s.ChannelRef) -> s.Channel:
    return _channel_out(await own_channel(ctx, data.name))


@router.command("settings.channel.list", "owner")
async def list_channels(ctx: Context, data: s.Empty) -> s.ChannelList:
    rows = await channels.of_owner(ctx.conn, ctx.owner_id)
    return s.ChannelList(channels=[_channel_out(row) for row in rows])


@router.command("settings.channel.delete", "owner")
async def delete_channel(ctx: Context, data: s.ChannelRef) -> s.Removed:
    await own_channel(ctx, data.name)
    await channels.remove(ctx.conn, ctx.owner_id, data.name)
    ctx.emit("channel.deleted", {"name": data.name})
    return s.Removed()
