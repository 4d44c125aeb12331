"""Reservation ids: unique per reservation, across processes, without a system call each."""

from __future__ import annotations

import os

from gateway.limits.store import new_reservation_id


def test_ids_for_one_request_id_differ_and_keep_it_as_their_prefix() -> None:
    ids = {new_reservation_id("req-1") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("req-1.") for i in ids)


def test_a_forked_child_draws_its_own_prefix() -> None:
    """A child forked after ids were drawn would otherwise repeat the parent's next ids."""
    new_reservation_id("r")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        try:
            os.write(write, new_reservation_id("r").encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    theirs = os.read(read, 200).decode()
    os.close(read)
    ours = new_reservation_id("r")
    assert theirs != ours
    assert theirs.rsplit("-", 1)[0] != ours.rsplit("-", 1)[0]  # another process prefix
