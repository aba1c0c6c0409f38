"""Which `reply_to` a command may name (contract section 3).

A reply goes to the default exchange with routing key = `reply_to`. Most names are harmless: a
queue that does not exist simply drops the reply. These are not:

- the worker's own queues (`P.…`): a reply there would be read as a command, an email job or a
  dead letter;
- the broker's names (`amq.…`), among them direct reply-to tokens,
  `amq.rabbitmq.reply-to.<PidEnc>.<Key>`. RabbitMQ 3.10 decodes a token in the publishing
  channel's process without catching errors (`rabbit_channel:deliver_reply`,
  `rabbit_direct_reply_to:decode_reply_to_v2`, `pid_recomposition:from_binary`): a token it
  cannot decode, and also a well-formed one naming a node that is not running, crashes that
  process, and the broker closes the worker's whole connection (541 INTERNAL_ERROR) with every
  command in flight on it.

So a token is accepted only exactly as the broker forms it (`compute_key_and_suffix_v2`):

    PidEnc  standard base64 of 0x83 0x58 (NEW_PID_EXT), the node atom `reply@<phash2 of the node>`
            as 0x76 (ATOM_UTF8_EXT, 2-byte length) or 0x77 (SMALL_ATOM_UTF8_EXT, 1-byte length),
            then 12 bytes: ID, serial, creation
    Key     standard base64 of 16 random bytes

`from_binary` knows no other atom tags: 0x64 (ATOM_EXT) and 0x73 (SMALL_ATOM_EXT) crash it too.
A token of a channel that has since closed is harmless: the broker drops the reply.

On a cluster, a client connected to another node than the worker's holds a token naming its own
node, and the broker routes a reply to it across the cluster while that node runs. The worker
cannot tell a running node of its cluster from a node that is down or never existed, so a token
of any node is accepted (contract section 3: a token as the broker forms it), and only the
reply's publishing differs (worker.broker.Broker.publish_reply): to a token of the node the
worker is connected to (the one node it knows to be running), on its reply channel; to any other
node's, on a connection of its own, so that a token the broker cannot route costs that reply
(dropped), never the worker's connection.
"""

from __future__ import annotations

import base64
import binascii
import re

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_TOKEN_PREFIX = DIRECT_REPLY_TO + "."
_MAX_BYTES = 255  # an AMQP short string
_NEW_PID_EXT = b"\x83\x58"
_ATOM_UTF8_EXT, _SMALL_ATOM_UTF8_EXT = 0x76, 0x77
_PID_TAIL_BYTES = 12
_KEY_BYTES = 16
_NODE = re.compile(r"reply@(?:0|[1-9][0-9]*)")


def _strict_b64decode(text: str) -> bytes | None:
    """`text` decoded if it is canonical standard base64 with its padding, else None."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    # Canonical only: no stray bits in the last character, padding where it belongs.
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def token_node(reply_to: str) -> str | None:
    """The node (`reply@<hash>`) of a direct reply-to token formed as the broker forms it."""
    if not reply_to.startswith(_TOKEN_PREFIX):
        return None
    parts = reply_to[len(_TOKEN_PREFIX) :].split(".")
    if len(parts) != 2:
        return None
    pid, key = (_strict_b64decode(part) for part in parts)
    if pid is None or key is None or len(key) != _KEY_BYTES or len(pid) < 5:
        return None
    if pid[:2] != _NEW_PID_EXT:
        return None
    if pid[2] == _ATOM_UTF8_EXT:
        length, start = int.from_bytes(pid[3:5], "big"), 5
    elif pid[2] == _SMALL_ATOM_UTF8_EXT:
        length, start = pid[3], 4
    else:
        return None
    if len(pid) != start + length + _PID_TAIL_BYTES:
        return None
    node = pid[start : start + length].decode("ascii", errors="replace")
    return node if _NODE.fullmatch(node) else None


def refusal(reply_to: str, prefix: str) -> str | None:
    """Why a command may not name `reply_to`; None when it may."""
    try:
        size = len(reply_to.encode())
    except UnicodeEncodeError:  # a lone surrogate: no queue has that name
        return "not UTF-8"
    if not 0 < size <= _MAX_BYTES:
        return "not 1 to 255 bytes"
    if reply_to == DIRECT_REPLY_TO:
        return None
    if reply_to.startswith(_TOKEN_PREFIX):
        if token_node(reply_to) is None:
            return "not a direct reply-to token as the broker forms it"
        return None
    if reply_to.startswith("amq."):
        return "a name the broker reserves"
    if reply_to.startswith(prefix + "."):
        return "a queue of the worker"
    return None
