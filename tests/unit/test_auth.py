"""Tenant keys: hashing, generation and bearer parsing."""

from __future__ import annotations

import pytest

from gateway.config import KeySettings
from gateway.errors import InvalidApiKey
from gateway.front.auth import Credential, authenticate, bearer_token, hash_key, new_key


def test_hash_is_sha256_hex_of_the_key() -> None:
    assert hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_new_keys_are_random_and_long() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100 and all(len(k) > 40 and k.startswith("igw_") for k in keys)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer k", "k"),
        ("bearer  k ", "k"),
        ("Basic k", None),
        ("Bearer", None),
        ("", None),
        (None, None),
        ("Bearer \udcff\udcfe", None),
        ("Bearer caf\u00e9", None),
        ("Bearer a b", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_authenticate_finds_the_tenant_and_rejects_others() -> None:
    key = KeySettings(hash=hash_key("secret"), name="ci")
    index = {key.hash: Credential("team", key, 0)}
    assert authenticate(index, "Bearer secret").tenant == "team"
    assert authenticate(index, "Bearer secret").key_label == "ci"
    for header in (None, "Bearer other", "Bearer secret2"):
        with pytest.raises(InvalidApiKey):
            authenticate(index, header)
