from __future__ import annotations

import pytest

from system.core import checkpointed
from system.core.checkpointed import CheckpointedUsers
from system.core.sharding import slot_of


def users_of(slot: int, count: int, prefix: str = "u") -> list[str]:
    return [u for u in (f"{prefix}{i}" for i in range(200_000)) if slot_of(u) == slot][:count]


def test_only_a_user_of_an_indexed_slot_missing_from_it_has_no_checkpoint() -> None:
    index = CheckpointedUsers()
    stored, new = users_of(5, 30)[:20], users_of(5, 30)[20:]
    other_slot = users_of(6, 3)
    assert all(index.may_have(stored + new + other_slot))  # nothing indexed: every user may have one
    index.add_slots(stored, index.generations([5]))
    assert index.may_have(stored) == [True] * 20
    assert index.may_have(new) == [False] * 10
    assert all(index.may_have(other_slot))  # slot 6 was not read: maybe


def test_a_checkpoint_being_written_counts_before_it_lands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpointed, "MERGE_AFTER", 5)  # merged into the sorted array on the way
    index = CheckpointedUsers()
    index.add_slots([], index.generations([7]))
    users = users_of(7, 40)
    assert not any(index.may_have(users))
    for k in range(0, 40, 4):
        index.add(users[k : k + 4])
        assert all(index.may_have(users[: k + 4])) and not any(index.may_have(users[k + 4 :]))
    assert len(index) == 40


def test_a_slot_given_up_is_not_indexed_even_by_a_read_that_began_before() -> None:
    index = CheckpointedUsers()
    users = users_of(9, 10)
    index.add_slots(users[:5], index.generations([9]))
    index.forget([9])  # another shard may write its users now
    assert all(index.may_have(users))
    generations = index.generations([9])
    index.forget([9])  # given up (again) while a read of it was under way
    index.add_slots(users[:5], generations)
    assert 9 not in index.indexed and all(index.may_have(users))
    index.add_slots(users[:5], index.generations([9]))  # read after it was taken back
    assert index.may_have(users) == [True] * 5 + [False] * 5
