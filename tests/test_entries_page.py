"""Paged reads of a database in (height, ID) order: what bootstrap answers are built from."""

from __future__ import annotations

from dag import Permission, Status
from tests.conftest import InstanceFactory
from tests.histories import history, raws


def test_pages_cover_the_verified_history_once_in_order(make_instance: InstanceFactory) -> None:
    instance = make_instance()
    db = instance.create_database(name="paged")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
    for i in range(20):
        with db.transaction() as txn:
            txn.doc("d").set(f"k{i % 3}", i)
    # A second writer's branch at the same heights, so pages split between equal heights.
    other = make_instance()
    other.put_remote_entries([raw for _cid, raw in db.raw_entries()])
    theirs = other.open_database(db.id)
    for i in range(20):
        with theirs.transaction() as txn:
            txn.doc("d").set("theirs", i)
        with db.transaction() as txn:
            txn.doc("d").set("ours", i)
    merged = instance.put_remote_entries([raw for _cid, raw in theirs.raw_entries()])
    assert len(merged.verified) == 20
    heights = [h for _c, h, _r in instance.storage.iter_entries(db.root_cid, None)]
    assert len(heights) > len(set(heights))  # entries share heights
    expected = [(cid, height) for cid, height, _raw in instance.storage.iter_entries(db.root_cid, None)]
    for limit in (1, 7, 1000):
        seen: list[tuple[bytes, int]] = []
        after = None
        while True:
            page = db.entries_page(after, limit)
            assert len(page) <= limit
            if not page:
                break
            seen += [(cid, height) for cid, height, _raw in page]
            after = (page[-1][1], page[-1][0])
        assert seen == expected
    assert {raw for _c, _h, raw in db.entries_page(None, 1000)} == {raw for _c, raw in db.raw_entries()}


def test_pages_hold_only_the_status_asked_for(make_instance: InstanceFactory) -> None:
    db = history(make_instance(), 3)
    entries = raws(db)
    target = make_instance()
    target.put_remote_entries(entries[:1] + entries[2:])  # one entry missing: the rest waits
    copy = target.open_database(db.id)
    verified = copy.entries_page(None, 100)
    waiting = copy.entries_page(None, 100, status=Status.UNVERIFIED)
    assert len(verified) == 1 and len(waiting) == len(entries) - 2
    assert not {c for c, _h, _r in verified} & {c for c, _h, _r in waiting}
