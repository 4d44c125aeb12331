"""Tenant authentication: a bearer key becomes a Credential, by the SHA-256 of the key.

Only `sha256:<hex>` digests are configured, never plaintext keys. A presented key is hashed
and looked up by digest, then compared with `hmac.compare_digest`, so neither the lookup nor
the comparison depends on the secret's bytes in a way an attacker can time.

A key that verified is remembered (`Keys`), so a tenant's next request skips the hashing. Only keys
whose digest is configured get there, at most one per digest: a flood of random keys cannot grow
it. It belongs to one configuration's Runtime, so a reload (a key revoked) starts it empty. The
remembered key is looked up by Python's string hash, keyed with the process's secret random seed,
and compared only once that full hash matches: its timing tells nothing of the key's bytes.
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


class Keys:
    """One configuration's credentials by key digest (`sha256:<hex>`), and the keys that verified."""

    __slots__ = ("_verified", "by_digest")

    def __init__(self, by_digest: Mapping[str, Credential]) -> None:
        self.by_digest = by_digest
        self._verified: dict[str, Credential] = {}  # presented key -> its credential

    def authenticate(self, authorization: str | None) -> Credential:
        """The credential for an `Authorization: Bearer ...` header, or InvalidApiKey."""
        if authorization is not None and authorization[:7] == "Bearer ":
            known = self._verified.get(authorization[7:])
            if known is not None:
                return known
        token, credential = self._verify(authorization)
        self._verified[token] = credential
        return credential

    def _verify(self, authorization: str | None) -> tuple[str, Credential]:
        """The key presented and its credential, found by the key's digest; or InvalidApiKey."""
        token = bearer_token(authorization)
        if token is None and authorization and authorization[:7].lower() == "bearer ":
            raise InvalidApiKey("Incorrect API key provided.")  # a key, but not one that could exist
        if token is None:
            raise InvalidApiKey("You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
        digest = hash_key(token)
        credential = self.by_digest.get(digest)
        if credential is None or not hmac.compare_digest(credential.key.hash, digest):
            raise InvalidApiKey("Incorrect API key provided.")
        return token, credential
