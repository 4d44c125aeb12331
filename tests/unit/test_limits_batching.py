"""The batcher's own RESP packing must be byte-for-byte what redis-py would send."""

from __future__ import annotations

import asyncio

from redis.asyncio.connection import Connection

from gateway.limits.batching import _Call, _pack_evalsha
from gateway.limits.scripts import RESERVE


async def test_evalsha_is_packed_exactly_as_redis_py_packs_it() -> None:
    keys = ["igw:{équipe 🎨}:rsv:r.1", "igw:{équipe 🎨}:settled:r.1", ""]
    args: list[str | int] = ["r.1", 20_413, "enforce", "gpt-image-1.5", 0, -1, "rate 10 1 0 0"]
    call = _Call(RESERVE, keys, args, asyncio.get_running_loop().create_future())
    expected = b"".join(Connection().pack_command("EVALSHA", *call.argv()))
    assert _pack_evalsha(call) == expected
