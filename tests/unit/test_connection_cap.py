"""The front door's default connection cap (`server.max_connections` unset), sized from the file
limit less a reserve of 64 and the operations listener's 64: upstream pools sized for many open
streams must not collapse it."""

from __future__ import annotations

import resource

import pytest

from gateway.config import Settings
from gateway.front.connections import default_max_connections
from tests.support.config import make_settings


def settings_with_pools(size: int) -> Settings:
    settings = make_settings("http://127.0.0.1:9/v1")
    upstreams = {
        name: u.model_copy(update={"max_connections": size}) for name, u in settings.upstreams.items()
    }
    return settings.model_copy(update={"upstreams": upstreams})


@pytest.mark.parametrize(
    ("files", "pools", "cap"),
    [
        (20_000, 1024, 20_000 - 128 - 2 * 1024),  # small pools: the file limit less the pools
        (20_000, 10_256, (20_000 - 128) // 2),  # pools for 10k streams: half the descriptors each way
        (1_048_576, 10_256, 1_048_576 - 128 - 2 * 10_256),
        (256, 1024, 64),
    ],
)
def test_the_cap_leaves_room_for_the_upstream_connections_clients_can_use(
    monkeypatch: pytest.MonkeyPatch, files: int, pools: int, cap: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (files, files))
    assert default_max_connections(settings_with_pools(pools)) == cap
