"""Tenant keys: hashing, generation and bearer parsing."""

from __future__ import annotations

import pytest

from gateway.config import KeySettings
from gateway.errors import InvalidApiKey
from gateway.front.auth import Credential, Keys, bearer_token, hash_key, new_key
from gateway.runtime import Runtime
from tests.support.config import TENANT_KEY, make_settings


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


def _keys() -> Keys:
    key = KeySettings(hash=hash_key("secret"), name="ci")
    return Keys({key.hash: Credential("team", key, 0)})


def test_authenticate_finds_the_tenant_and_rejects_others() -> None:
    keys = _keys()
    assert keys.authenticate("Bearer secret").tenant == "team"
    assert keys.authenticate("Bearer secret").key_label == "ci"  # remembered
    assert keys.authenticate("bearer  secret ").tenant == "team"
    for header in (None, "Bearer other", "Bearer secret2", "Bearer secre", "Bearer secret x", "Basic secret"):
        with pytest.raises(InvalidApiKey):
            keys.authenticate(header)


def test_only_keys_that_verified_are_remembered() -> None:
    keys = _keys()
    for _ in range(1000):  # a flood of wrong keys leaves nothing behind
        with pytest.raises(InvalidApiKey):
            keys.authenticate(f"Bearer {new_key()}")
    assert keys._verified == {}
    for header in ("Bearer secret", "bearer secret", "Bearer  secret  "):
        keys.authenticate(header)
    assert list(keys._verified) == ["secret"]  # one entry per configured key, whatever the header


def test_a_reload_forgets_the_keys_that_verified() -> None:
    settings = make_settings("http://127.0.0.1:9/v1")
    before = Runtime.build(settings)
    assert before.credentials.authenticate(f"Bearer {TENANT_KEY}").tenant == "team"
    settings.tenants.pop("team")  # the key revoked: the next configuration refuses it at once
    after = Runtime.build(settings)
    with pytest.raises(InvalidApiKey):
        after.credentials.authenticate(f"Bearer {TENANT_KEY}")
