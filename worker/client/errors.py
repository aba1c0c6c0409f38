"""What a client raises when it cannot hand back a reply or an event.

    ClientError
    ├── BrokerUnreachable (ConnectionError) .. no node of the URL list answered
    ├── NoWorker ............................. `P.commands` or `P.events` does not exist: no
    │                                          worker has ever run with this prefix
    ├── Unroutable ........................... no queue is bound for the command's type
    ├── NoReply (TimeoutError) ............... no reply within the call's timeout
    ├── ConnectionLost (ConnectionError) ..... an event stream's connection broke (a call
    │                                          reconnects and resends by itself, see `Client.call`)
    └── BadReply ............................. a reply that is no reply, or whose success does
                                               not match its command's model (typed shortcuts)

A command the worker refuses is not an exception: `call` returns its `ErrorReply`.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of every error of `worker.client`."""


class BrokerUnreachable(ClientError, ConnectionError):
    pass


class NoWorker(ClientError):
    pass


class Unroutable(ClientError):
    pass


class NoReply(ClientError, TimeoutError):
    pass


class ConnectionLost(ClientError, ConnectionError):
    pass


class BadReply(ClientError):
    pass
