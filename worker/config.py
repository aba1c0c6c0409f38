"""Configuration: every `SMTP_WORKER_*` variable of the contract, in one Settings object."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from worker.connection import split_urls


class Settings(BaseSettings):
    # A value is never repeated in a validation error: AMQP and database URLs hold passwords.
    model_config = SettingsConfigDict(
        env_prefix="SMTP_WORKER_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    # One node's URL, or the nodes of one cluster separated by commas (see node_urls()).
    amqp_url: str = Field(default="amqp://guest:guest@localhost:5672/", repr=False)
    database_url: str = "sqlite+aiosqlite:///var/smtp-worker.db"
    secret_key: SecretStr | None = None
    prefix: str = Field(default="smtp", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    retry_delays: Annotated[tuple[float, ...], NoDecode] = (5, 30, 120, 600, 1800)
    idempotency_ttl: float = Field(default=86400, gt=0)
    max_message_bytes: int = Field(default=1048576, ge=1024)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    # `host:port` of the HTTP endpoints (/metrics, /healthz, /readyz); empty turns them off.
    http: str = "127.0.0.1:9464"
    # Addresses a relay may be at although the relay address policy denies them (contract 5).
    relay_allow: Annotated[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], NoDecode] = ()

    # Not in the contract's table: tuning knobs with sensible defaults.
    prefetch: int = Field(default=256, ge=1, le=65535)
    shutdown_grace: float = Field(default=30, gt=0)
    secret_key_file: str = "var/secret.key"

    def node_urls(self) -> list[str]:
        """The broker nodes of `amqp_url`, in the order the worker tries them."""
        return split_urls(self.amqp_url)

    @field_validator("amqp_url")
    @classmethod
    def _node_urls(cls, value: str) -> str:
        # Says which, never what: a URL may hold a password.
        for number, url in enumerate(split_urls(value), 1):
            try:
                parsed = URL(url)
                valid = parsed.scheme in {"amqp", "amqps"} and bool(parsed.host)
            except ValueError:
                valid = False
            if not valid:
                raise ValueError(f"URL {number} is not an amqp:// or amqps:// URL with a host")
        return value

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("retry_delays")
    @classmethod
    def _positive_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay <= 0 for delay in value):
            raise ValueError("every retry delay must be positive")
        return value

    @field_validator("relay_allow", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            # strict=False: "10.1.2.3/8" means the network 10.0.0.0/8, as an operator meant it.
            return tuple(ipaddress.ip_network(part, strict=False) for part in value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value
