"""Email: composing the contract's messages and sending them through SMTP relays.

`compose` builds the ticket and hit emails (pure functions); `relay` probes a relay's settings
and keeps a pool of reused connections per relay, translating SMTP failures into
`SmtpTransientError` / `SmtpPermanentError`; `policy` decides which addresses a relay may be at.
"""

from worker.mail.compose import (
    has_line_break,
    hit_email,
    hit_message_id,
    ticket_email,
    ticket_message_id,
)
from worker.mail.relay import ProbeResult, Relay, SmtpPool, Stage, StartTLS, probe, relay_of

__all__ = [
    "ProbeResult",
    "Relay",
    "SmtpPool",
    "Stage",
    "StartTLS",
    "has_line_break",
    "hit_email",
    "hit_message_id",
    "probe",
    "relay_of",
    "ticket_email",
    "ticket_message_id",
]
