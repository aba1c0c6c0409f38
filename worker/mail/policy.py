"""Which addresses the worker may connect to as an SMTP relay (contract section 5).

By default only public unicast addresses. Loopback, private (RFC 1918, RFC 4193), link-local,
CGNAT, multicast, unspecified, documentation and other reserved ranges are denied, unless
`SMTP_WORKER_RELAY_ALLOW` lists them. Without this, a relay's settings would let any owner make
the worker knock on the services of its own network (a database, a broker, a cloud metadata
endpoint) and report what it found.

IPv6 forms that carry an IPv4 address are judged by that address: IPv4-mapped
(`::ffff:127.0.0.1`, which the kernel sends to 127.0.0.1), NAT64 (`64:ff9b::/96`) and 6to4
(`2002::/16`). Other IPv6 addresses must be global unicast (`2000::/3`), outside its special
ranges (Teredo and the other IETF assignments, documentation).

The check is made on the addresses a host name resolves to, at connection time, and the
connection goes to the address checked: see `worker.mail.relay`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

__all__ = ["Address", "Network", "is_allowed", "literal_address", "unwrap"]

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

_DENIED_V4 = tuple(
    IPv4Network(network)
    for network in (
        "0.0.0.0/8",  # "this network", the unspecified address
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # CGNAT, RFC 6598
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata endpoints
        "172.16.0.0/12",  # RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast, deprecated
        "192.168.0.0/16",  # RFC 1918
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
    )
)
_GLOBAL_UNICAST_V6 = IPv6Network("2000::/3")
_DENIED_V6 = tuple(
    IPv6Network(network)
    for network in (
        "2001::/23",  # IETF protocol assignments: Teredo, benchmarking, ORCHID
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
    )
)
_NAT64 = IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = IPv6Network("2002::/16")

# inet_aton's numbers: decimal, octal with a leading 0, hex with 0x.
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def unwrap(address: Address) -> Address:
    """The address a connection really goes to: an IPv4-mapped IPv6 address is its IPv4 one."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_allowed(address: Address, allow: Iterable[Network] = ()) -> bool:
    """True when a relay may be at `address`: a public unicast address, or one `allow` lists."""
    address = unwrap(address)
    allow = tuple(allow)
    # `in` is False across IP versions, so one list may hold both.
    if any(address in network for network in allow):
        return True
    if isinstance(address, IPv4Address):
        return not any(address in network for network in _DENIED_V4)
    embedded = _embedded_v4(address)
    if embedded is not None:
        return is_allowed(embedded, allow)
    return address in _GLOBAL_UNICAST_V6 and not any(address in n for n in _DENIED_V6)


def literal_address(host: str) -> Address | None:
    """The IP address `host` spells, in any form a resolver takes as a number; None for a name.

    Besides the usual forms (`127.0.0.1`, `::1`, `[::1]`) these are inet_aton's legacy ones,
    which getaddrinfo still accepts: `127.1`, `0x7f000001`, `2130706433`, `0177.0.0.1`.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ip_address(host)
    except ValueError:
        return _inet_aton(host)


def _embedded_v4(address: IPv6Address) -> IPv4Address | None:
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return address.sixtofour
    return None


def _inet_aton(host: str) -> IPv4Address | None:
    """`a`, `a.b`, `a.b.c` or `a.b.c.d`, the last part filling the remaining bytes."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_NUMBER.fullmatch(part) for part in parts):
        return None
    *head, last = [int(part, 0) if part[:2].lower() == "0x" else _int(part) for part in parts]
    if any(value > 0xFF for value in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    value = 0
    for byte in head:
        value = value << 8 | byte
    return IPv4Address(value << (8 * (4 - len(head))) | last)


def _int(part: str) -> int:
    return int(part, 8) if part.startswith("0") else int(part)
