"""The batcher's own RESP packing must be byte-for-byte what redis-py would send; a batch's
replies reach its callers as the lean connection reads them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.limits import resp
from gateway.limits.batching import EvalBatcher, _Call, _pack
from gateway.limits.resp import _Protocol, command, repeating_command
from gateway.limits.scripts import RESERVE


async def test_evalsha_and_eval_are_packed_exactly_as_redis_py_packs_them() -> None:
    keys = ["igw:{équipe 🎨}:rsv:r.1", "igw:{équipe 🎨}:settled:r.1", ""]
    args: list[str | int | bytes] = ["r.1", 20_413, "enforce", "gpt-image-1.5", 0, -1, "rate 10 1 0 0", 2**70]
    args += [b"\r\n$3\x00\xff", b"", "1", b"1", 1, "20413", b"r.1"]  # binary; the same as another type
    future = asyncio.get_running_loop().create_future()
    for call in (_Call(RESERVE, keys, args, future), _Call(RESERVE, keys, args[::-1], future)):
        for as_command in (_Call.by_sha, _Call.by_source):
            expected = b"".join(Connection().pack_command(*as_command(call)))
            assert _pack([call], as_command) == expected
            assert _pack([call], as_command) == expected  # its arguments' encodings kept


def test_repeating_command_encodes_what_it_keeps_no_longer_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resp, "ENCODINGS_KEPT", 3)
    monkeypatch.setattr(resp, "_encodings", {})
    for n in range(10):
        assert repeating_command("GET", n, str(n)) == command("GET", n, str(n))
        assert len(resp._encodings) <= 3
    assert repeating_command("GET", 1) == command("GET", 1)


@pytest.mark.parametrize("odd", [True, 1.0])
def test_repeating_command_refuses_what_would_take_an_ints_encoding(
    odd: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """True == 1 and 1.0 == 1: kept, their encoding would be 1's."""
    monkeypatch.setattr(resp, "_encodings", {})
    with pytest.raises(TypeError):
        repeating_command("GET", odd)  # type: ignore[arg-type]
    assert repeating_command("GET", 1) == b"*2\r\n$3\r\nGET\r\n$1\r\n1\r\n"


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        pass


async def test_a_write_gets_its_replies_as_the_last_one_is_read() -> None:
    protocol = _Protocol(reply_timeout=5.0, give_up_after=10.0)
    protocol.connection_made(_Transport())
    got: list[list[Any] | BaseException] = []
    protocol.send(command("SET", "k", "v") + command("NOPE"), 2, got.append)
    protocol.data_received(b"+OK\r\n")
    assert got == []
    protocol.data_received(b"-ERR unknown command 'NOPE'\r\n")
    [replies] = got
    assert isinstance(replies, list) and replies[0] == b"OK" and isinstance(replies[1], ResponseError)
    protocol.send(command("PING"), 1, got.append)
    protocol.connection_lost(None)
    assert isinstance(got[1], RedisConnectionError)


class _Lean:
    """A connected lean connection that keeps what it is sent, to answer by hand."""

    def __init__(self, idle: bool = False) -> None:
        self.done: list[Callable[[list[Any] | BaseException], None]] = []
        self.sent: list[int] = []  # how many calls each write carried
        self.idle = idle  # owing nothing until the first write; else always owing (under load)

    def owes_nothing(self) -> bool:
        return self.idle and not self.done

    def send(self, payload: bytes, replies: int, done: Callable[[list[Any] | BaseException], None]) -> bool:
        self.done.append(done)
        self.sent.append(replies)
        return True


async def test_the_callers_of_a_batch_are_settled_when_its_replies_are_read_not_a_turn_later() -> None:
    lean = _Lean()
    batcher = EvalBatcher(None, asyncio.Semaphore(1), lean)  # type: ignore[arg-type]
    first, second = batcher.evalsha(RESERVE, ["k"], []), batcher.evalsha(RESERVE, ["k"], [])
    await asyncio.sleep(0)  # the flush: one write for both
    [done] = lean.done
    done([1, ResponseError("over")])
    assert first.result() == 1
    assert isinstance(second.exception(), ResponseError)


async def test_a_call_on_a_connection_owing_nothing_is_written_at_once_later_ones_batched() -> None:
    lean = _Lean(idle=True)
    batcher = EvalBatcher(None, asyncio.Semaphore(1), lean)  # type: ignore[arg-type]
    calls = [batcher.evalsha(RESERVE, ["k"], []) for _ in range(3)]
    assert lean.sent == [1]  # the first: no loop turn waited
    await asyncio.sleep(0)  # the flush of the rest: one write
    assert lean.sent == [1, 2]
    lean.done[0]([1])
    lean.done[1]([2, 3])
    assert [call.result() for call in calls] == [1, 2, 3]


async def test_calls_that_close_sent_are_not_flushed_again_at_the_turn_end() -> None:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    lean = _Lean()
    lean.close = _closed  # type: ignore[attr-defined]
    batcher = EvalBatcher(None, asyncio.Semaphore(1), lean)  # type: ignore[arg-type]
    call = batcher.evalsha(RESERVE, ["k"], [])  # its flush is called soon
    asyncio.get_running_loop().call_soon(lambda: lean.done[0]([1]))  # and then its reply
    await batcher.close(wait=1)  # sends the call before either comes
    assert call.result() == 1 and len(lean.done) == 1
    assert errors == []


async def _closed() -> None:
    pass
