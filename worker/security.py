"""Tokens, hashes and encryption at rest.

Tokens and passwords are ours: 256 random bits each, so a fast keyed hash (HMAC-SHA256) is as
strong as a slow password KDF against guessing, and costs microseconds instead of the hundreds of
milliseconds per message a KDF would. Relay passwords must be given back to the relay, so they
are encrypted (AES-GCM), not hashed. Both keys are derived from SECRET_KEY.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_NONCE_BYTES = 12


def new_token() -> str:
    """A URL-safe secret with 256 bits of randomness."""
    return secrets.token_urlsafe(32)


def new_id(nbytes: int = 16) -> str:
    """An opaque, unguessable, URL-safe identifier (128 bits by default)."""
    return secrets.token_urlsafe(nbytes)


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


class Keyring:
    """Hashes our tokens and encrypts relay passwords with keys derived from SECRET_KEY."""

    def __init__(self, secret_key: str) -> None:
        secret = secret_key.encode()
        self._hash_key = _derive(secret, b"smtp-worker/token-hash/v1")
        self._aead = AESGCM(_derive(secret, b"smtp-worker/relay-password/v1"))

    def hash(self, token: str) -> str:
        return hmac.new(self._hash_key, token.encode(), hashlib.sha256).hexdigest()

    def verify(self, token: str, stored_hash: str) -> bool:
        return hmac.compare_digest(self.hash(token), stored_hash)

    def encrypt(self, plaintext: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), None)
        return base64.urlsafe_b64encode(nonce + sealed).decode()

    def decrypt(self, ciphertext: str) -> str:
        raw = base64.urlsafe_b64decode(ciphertext.encode())
        return self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], None).decode()


def load_or_create_secret_key(path: str | Path) -> str:
    """Reads the key file, or creates it (mode 0600) with a new key when it does not exist.

    `O_EXCL` makes the creation atomic, so workers starting together agree on one key.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = new_token()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another worker won the race: read its key below
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(key + "\n")
            return key
    # The winner may not have written its key yet.
    for _ in range(50):
        if key := path.read_text().strip():
            return key
        time.sleep(0.02)
    raise RuntimeError(f"{path} is empty")
