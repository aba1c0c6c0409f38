"""Command data the settings tests share: email settings, and options that reach a test server."""

from __future__ import annotations

from typing import Any

from tests.support.smtp_servers import SmtpServer


def email_settings(domain: str, **options: Any) -> dict[str, Any]:
    """`settings.email.create` data for `domain`; `options` add to, or replace, host and port."""
    return {
        "domain": domain,
        "provider": "smtp",
        "from": f"Alerts <alerts@{domain}>",
        "options": {"host": "smtp.example.com", "port": 587, **options},
    }


def relay_options(srv: SmtpServer, **overrides: Any) -> dict[str, Any]:
    """Options reaching `srv`: its port, its login, TLS from the first byte when it is implicit.

    Its certificate is self-signed, so it is accepted unless `tls` says otherwise.
    """
    options: dict[str, Any] = {
        "host": srv.host,
        "port": srv.port,
        "secure": srv.tls == "implicit",
        "tls": {"rejectUnauthorized": False},
        "timeout": 5,
    }
    if srv.auth is not None:
        options["auth"] = {"user": srv.auth[0], "pass": srv.auth[1]}
    return options | overrides
