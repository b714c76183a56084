"""Request ids: version 4 UUIDs, all different, and a forked child never repeats its parent's."""

from __future__ import annotations

import os
import uuid

from caracald.gateway.request_ids import new_request_id


def test_ids_are_random_version_4_uuids_and_never_repeat() -> None:
    ids = [new_request_id() for _ in range(2000)]  # several refills of the buffer
    assert len(set(ids)) == len(ids)
    assert all(i.version == 4 and i.variant == uuid.RFC_4122 for i in ids)


def test_a_forked_child_does_not_hand_out_the_ids_its_parent_would() -> None:
    new_request_id()  # the buffer holds ids the parent has not handed out yet
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, new_request_id().bytes)
        os._exit(0)
    os.waitpid(child, 0)
    from_child = uuid.UUID(bytes=os.read(read, 16))
    os.close(read)
    os.close(write)
    assert from_child != new_request_id()
