"""Settings commands: email settings per domain, SMTP users, channels (contract section 6)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from schemas._types import (
    BodyText,
    DomainName,
    EmailAddress,
    HeaderText,
    HostName,
    Mailbox,
    Name,
    Positive,
    distinct_addresses,
    in_domain,
    split_mailbox,
)


class _Data(BaseModel):
    """Command data: strict types, and unknown fields are a mistake worth reporting."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class Empty(_Data):
    pass


# --- email settings -----------------------------------------------------------------------------

Starttls = Literal["auto", "always", "never"]
# Seconds each step of a relay conversation may take.
TIMEOUT_MIN, TIMEOUT_MAX = 1, 120
Timeout = Annotated[int | float, Field(ge=TIMEOUT_MIN, le=TIMEOUT_MAX)]
Port = Annotated[int, Field(ge=1, le=65535)]
Description = Annotated[str, StringConstraints(max_length=1000), BodyText]
Secret = Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class TlsOptions(_Data):
    rejectUnauthorized: bool = True  # noqa: N815 - the contract's name


class RelayAuth(_Data):
    user: Name
    pass_: Secret = Field(alias="pass", repr=False)


class SmtpOptions(_Data):
    host: HostName
    port: Port
    secure: bool = False
    starttls: Starttls = "auto"
    debug: bool = False
    tls: TlsOptions = TlsOptions()
    auth: RelayAuth | None = None
    timeout: Timeout = 30


def _from_in_domain(value: str | None, info: ValidationInfo) -> str | None:
    """`from` is an address at the settings' own domain or at a subdomain of it (contract 6)."""
    domain = info.data.get("domain")  # absent when the domain itself was refused
    if value is not None and domain is not None:
        address = split_mailbox(value).address
        if not in_domain(address, domain):
            raise ValueError(f"the address must be at {domain} or at a subdomain of it")
    return value


class EmailSettingsCreate(_Data):
    domain: DomainName
    provider: Literal["smtp"]
    description: Description | None = None
    from_: Mailbox = Field(alias="from")
    options: SmtpOptions

    from_in_domain = field_validator("from_")(_from_in_domain)


class RelayAuthPatch(_Data):
    user: Name | None = None
    pass_: Secret | None = Field(default=None, alias="pass", repr=False)


class SmtpOptionsPatch(_Data):
    host: HostName | None = None
    port: Port | None = None
    secure: bool | None = None
    starttls: Starttls | None = None
    debug: bool | None = None
    tls: TlsOptions | None = None
    auth: RelayAuthPatch | None = None
    timeout: Timeout | None = None


class EmailSettingsUpdate(_Data):
    """Given fields replace stored ones; `options` is merged key by key."""

    domain: DomainName
    provider: Literal["smtp"] | None = None
    description: Description | None = None
    from_: Mailbox | None = Field(default=None, alias="from")
    options: SmtpOptionsPatch | None = None

    from_in_domain = field_validator("from_")(_from_in_domain)


class DomainRef(_Data):
    domain: DomainName


class RelayAuthOut(_Out):
    user: str
    pass_: Literal["********"] = Field(default="********", alias="pass")


class SmtpOptionsOut(_Out):
    host: str
    port: int
    secure: bool
    starttls: Starttls
    debug: bool
    tls: TlsOptions
    auth: RelayAuthOut | None
    timeout: int | float


class EmailSettings(_Out):
    id: str
    domain: str
    provider: Literal["smtp"]
    description: str | None
    from_: str = Field(alias="from")
    options: SmtpOptionsOut
    created_at: datetime
    updated_at: datetime


class EmailTestResult(_Out):
    ok: bool
    stage: Literal["connect", "tls", "auth", "sender", "done"]
    message: str


class Removed(_Out):
    removed: Literal[1] = 1


# --- SMTP users ---------------------------------------------------------------------------------

UserStatus = Literal["Enable", "Disable"]
UserName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class SmtpUserAdd(_Data):
    total_limit: Positive
    hourly_limit: Positive


class SmtpUserEdit(_Data):
    smtp_user_name: UserName
    total_limit: Positive | None = None
    hourly_limit: Positive | None = None
    status: UserStatus | None = None


class SmtpUserRef(_Data):
    smtp_user_name: UserName


class SmtpUserCreated(_Out):
    smtp_user_name: str
    smtp_password: str
    status: UserStatus
    total_limit: int
    hourly_limit: int


class SmtpUserPassword(_Out):
    smtp_user_name: str
    smtp_password: str


class SmtpUser(_Out):
    smtp_user_name: str
    status: UserStatus
    total_limit: int
    hourly_limit: int
    total_sent: int
    hourly_sent: int
    created_at: datetime


class SmtpUserList(_Out):
    smtp_list: list[SmtpUser]


# --- channels -----------------------------------------------------------------------------------

ChannelName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$")]
SubjectPrefix = Annotated[str, StringConstraints(max_length=200), HeaderText]
# Recipients that differ only in case are one recipient: the first spelling is kept, in order.
Recipients = Annotated[
    list[EmailAddress], Field(min_length=1, max_length=100), AfterValidator(distinct_addresses)
]


class ChannelPut(_Data):
    name: ChannelName
    domain: DomainName
    recipients: Recipients
    subject_prefix: SubjectPrefix | None = None


class ChannelRef(_Data):
    name: ChannelName


class Channel(_Out):
    name: str
    domain: str
    recipients: list[str]
    subject_prefix: str
    created_at: datetime
    updated_at: datetime


class ChannelList(_Out):
    channels: list[Channel]
