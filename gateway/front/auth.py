"""Tenant authentication: a bearer key becomes a Credential, by the SHA-256 of the key.

Only `sha256:<hex>` digests are configured, never plaintext keys. A presented key is hashed
and looked up by digest, then compared with `hmac.compare_digest`, so neither the lookup nor
the comparison depends on the secret's bytes in a way an attacker can time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import KeySettings
from gateway.errors import InvalidApiKey

KEY_PREFIX = "igw_"
_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")


def hash_key(key: str) -> str:
    """The value to put in a tenant's `keys:` list for this plaintext key."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random tenant key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Credential:
    """Who is calling: the tenant, and which of its keys (for per-key limits and logs)."""

    tenant: str
    key: KeySettings
    key_index: int

    @property
    def key_label(self) -> str:
        return self.key.name or f"key{self.key_index}"


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Bearer <token>`, or None. A token is visible ASCII: anything else (bytes that
    are not UTF-8 arrive surrogate-escaped) is no key at all, refused before it is hashed."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN.fullmatch(token):
        return None
    return token


def authenticate(index: Mapping[str, Credential], authorization: str | None) -> Credential:
    """The credential for an `Authorization: Bearer ...` header, or InvalidApiKey."""
    token = bearer_token(authorization)
    if token is None and authorization and authorization[:7].lower() == "bearer ":
        raise InvalidApiKey("Incorrect API key provided.")  # a key, but not one that could exist
    if token is None:
        raise InvalidApiKey("You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
    digest = hash_key(token)
    credential = index.get(digest)
    if credential is None or not hmac.compare_digest(credential.key.hash, digest):
        raise InvalidApiKey("Incorrect API key provided.")
    return credential
