"""Security: settings judged by their result, revoked keys cut off, values bounded in depth.

Each test here is one attack from the security sweep (issue 10, defects 1, 2 and 9), run
against the database core and, where the attack came over the network, against a node
serving HTTP on loopback.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any

import httpx
import libipld
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dag import Entry, Instance, Permission, PermissionDeniedError, SigningKey, Status
from dag.auth import AuthSettings, check_auth_change
from dag.crdt.doc import MAX_VALUE_DEPTH
from dag.entry import build_entry
from dag.errors import InvalidValueError
from dag.ids import cid_to_text
from sync import SyncConfig, enable_sync
from sync.messages import Count, Error, Message, SendEntries, SyncTree, decode_message, encode_message
from sync.proofs import make_proof
from tests.conftest import InstanceFactory
from transports.http import API_PATH, HttpTransport
from transports.http_codec import CONTENT_MSGPACK

# ---- building hostile entries ------------------------------------------------------------


def wire_entry(
    db: Any, signer: SigningKey, stores: dict[str, dict[str, Any]], parents: list[bytes] | None = None
) -> Entry:
    """An entry signed by ``signer`` whose store deltas are given in their wire form (so an
    atomic marker ``""`` can be set), on ``parents`` (default: ``db``'s Verified tips)."""
    tree = db.root_cid
    parents = sorted(parents or db.tip_cids())
    height = 1 + max(db.entry(cid_to_text(p)).height for p in parents)
    pin = db.expected_pin(parents)
    encoded: list[tuple[str, list[bytes], bytes | None]] = []
    for name, delta in sorted(stores.items()):
        store_parents = pin if name == "_settings" else sorted(_store_tips_under(db, name, parents))
        encoded.append((name, store_parents, bytes(libipld.encode_dag_cbor(delta))))
    return build_entry(signer=signer, root=tree, parents=parents, height=height, settings_tips=pin, stores=encoded)


def _store_tips_under(db: Any, store: str, parents: list[bytes]) -> set[bytes]:
    """The tips of ``store`` within the closure of ``parents``."""
    members: set[bytes] = set()
    referenced: set[bytes] = set()
    for cid in db.ancestors(parents):
        entry = db.entry(cid_to_text(cid))
        node = entry.store(store)
        if node is not None:
            members.add(cid)
            referenced.update(node.parents)
    return members - referenced


def grant(permission: str) -> dict[str, str]:
    return {"permissions": permission, "status": "active"}


def with_admin(instance: Instance, rank: int = 5) -> tuple[Any, SigningKey]:
    db = instance.create_database(name="guarded")
    junior = SigningKey.generate()
    with db.transaction() as txn:
        txn.settings().add_key(junior.pubkey, Permission.admin(rank))
    return db, junior


# ---- defect 1: an atomic replacement of auth.keys -----------------------------------------


@pytest.mark.parametrize("replacement", ["only-itself", "empty", "whole-auth"])
def test_a_junior_admin_cannot_replace_the_key_set_locally(instance: Instance, replacement: str) -> None:
    db, junior = with_admin(instance)
    as_junior = db.with_key(junior)
    with pytest.raises(PermissionDeniedError), as_junior.transaction() as txn:
        if replacement == "only-itself":
            txn.settings().set("auth.keys", {junior.pubkey: grant("admin:5")})
        elif replacement == "empty":
            txn.settings().set("auth.keys", {})
        else:
            txn.settings().set("auth", {"keys": {junior.pubkey: grant("admin:5")}})
    assert db.settings().auth().permission_of(instance.device_id) == Permission.admin(0)


@pytest.mark.parametrize("keys_value", ["only-itself", "empty"])
def test_an_atomic_replacement_from_a_peer_fails_and_keeps_the_creator(
    make_instance: InstanceFactory, keys_value: str
) -> None:
    owner = make_instance()
    db, junior = with_admin(owner)
    keys: dict[str, Any] = {"": True}
    if keys_value == "only-itself":
        keys[junior.pubkey] = grant("admin:5")
    forged = wire_entry(db, junior, {"_settings": {"auth": {"keys": keys}}})
    result = owner.put_remote_entries([forged.raw])
    assert forged.id in result.failed and "cannot change a stronger key" in result.failed[forged.id]
    auth = db.settings().auth()
    assert auth.permission_of(owner.device_id) == Permission.admin(0)
    assert auth.permission_of(SigningKey.generate().pubkey) is None  # still protected
    with db.transaction() as txn:  # the creator still writes
        txn.doc("notes").set("after", 1)
    assert db.doc("notes").get("after") == 1


def test_admins_of_one_rank_cannot_depose_each_other(instance: Instance) -> None:
    db, first = with_admin(instance)
    second = SigningKey.generate()
    with db.transaction() as txn:
        txn.settings().add_key(second.pubkey, Permission.admin(5))
    as_first = db.with_key(first)
    with (
        pytest.raises(PermissionDeniedError, match=r"cannot drop, revoke or weaken key"),
        as_first.transaction() as txn,
    ):
        txn.settings().revoke_key(second.pubkey)
    with pytest.raises(PermissionDeniedError, match=r"weaken itself"), db.with_key(first).transaction() as txn:
        txn.settings().add_key(first.pubkey, Permission.write(0))
    with db.with_key(first).transaction() as txn:  # a weaker key is still theirs to manage
        txn.settings().add_key(SigningKey.generate().pubkey, Permission.admin(6))
    assert db.settings().auth().permission_of(second.pubkey) == Permission.admin(5)


def test_the_last_admin_is_never_removed() -> None:
    only = SigningKey.generate().pubkey
    before = AuthSettings.from_settings({"auth": {"keys": {only: grant("admin:1")}}})
    after = AuthSettings.from_settings({"auth": {"keys": {only: grant("write:1")}}})
    with pytest.raises(PermissionDeniedError, match=r"without an active admin"):
        check_auth_change(before, after, Permission.admin(0), "someone-stronger")


async def test_an_atomic_replacement_over_http_changes_nothing(make_instance: InstanceFactory) -> None:
    """The attack as it came: a junior admin pushes the replacement to a serving node."""
    owner = make_instance()
    db, junior = with_admin(owner)
    keys = {"": True, junior.pubkey: grant("admin:5")}
    forged = wire_entry(db, junior, {"_settings": {"auth": {"keys": keys}}})
    async with AsyncExitStack() as stack:
        url = await _serve(stack, owner)
        now = int(time.time() * 1000)
        proof = make_proof(junior, owner.device_id, db.root_cid, (), now)
        answer = await _post(url, SendEntries(db.root_cid, (forged.raw,), auth=proof))
        assert isinstance(answer, Count) and answer.failed == 1 and answer.stored == 0
        # A stranger still cannot read: the key set was not emptied.
        refused = await _post(url, SyncTree(db.root_cid))
        assert isinstance(refused, Error) and refused.code == "unauthorized"
    assert db.settings().auth().permission_of(owner.device_id) == Permission.admin(0)


async def _serve(stack: AsyncExitStack, instance: Instance) -> str:
    transport = HttpTransport(bind="127.0.0.1:0")
    stack.push_async_callback(transport.aclose)
    sync = await stack.enter_async_context(enable_sync(instance, config=SyncConfig(display_name="target")))
    sync.register_transport("http", transport)
    await sync.accept_connections()
    address = sync.listen_addresses()[0].address
    return f"http://{address}{API_PATH}"


async def _post(url: str, message: Message) -> Message:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        response = await client.post(url, content=encode_message(message), headers={"content-type": CONTENT_MSGPACK})
    return _first_frame(response.content)


def _first_frame(body: bytes) -> Message:
    # HTTP answers are length-prefixed msgpack frames (transports/http_codec.py); the first
    # frame is all these one-frame answers hold.
    length = int.from_bytes(body[:4], "big")
    return decode_message(body[4 : 4 + length])


# ---- property: random settings changes never lose the admin or raise a key ---------------

KEYS = [SigningKey.generate() for _ in range(4)]
PERMISSIONS = ["admin:0", "admin:3", "admin:5", "write:1", "write:7", "read"]
CHANGE = st.one_of(
    st.tuples(st.just("grant"), st.integers(0, 3), st.sampled_from(PERMISSIONS)),
    st.tuples(st.just("revoke"), st.integers(0, 3), st.just("")),
    st.tuples(st.just("drop"), st.integers(0, 3), st.just("")),
    st.tuples(st.just("replace"), st.sets(st.integers(0, 3)), st.sampled_from(PERMISSIONS)),
    st.tuples(st.just("global"), st.just(0), st.sampled_from([*PERMISSIONS, ""])),
)


def _apply_change(txn: Any, change: tuple[Any, Any, str]) -> None:
    kind, target, permission = change
    settings_doc = txn.settings()
    if kind == "grant":
        settings_doc.add_key(KEYS[target].pubkey, Permission.parse(permission))
    elif kind == "revoke":
        settings_doc.set(f"auth.keys.{KEYS[target].pubkey}.status", "revoked")
    elif kind == "drop":
        settings_doc.delete(f"auth.keys.{KEYS[target].pubkey}")
    elif kind == "replace":
        settings_doc.set("auth.keys", {KEYS[i].pubkey: grant(permission) for i in sorted(target)})
    else:
        settings_doc.set_global(Permission.parse(permission) if permission else None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(-1, 3), CHANGE), min_size=1, max_size=12))
def test_settings_changes_never_leave_no_admin_nor_raise_a_key_above_its_granter(
    steps: list[tuple[int, tuple[Any, Any, str]]],
) -> None:
    with Instance.in_memory() as instance, Instance.in_memory() as replica:
        db = instance.create_database()
        creator = instance.device_key
        for who, change in steps:
            signer = creator if who < 0 else KEYS[who]
            before = db.settings().auth()
            held = before.permission_of(signer.pubkey)
            try:
                with db.with_key(signer).transaction() as txn:
                    _apply_change(txn, change)
            except PermissionDeniedError:
                assert db.settings().auth() == before
                continue
            after = db.settings().auth()
            assert held is not None and held.is_admin
            for name in before.keys.keys() | after.keys.keys():
                new = after.keys.get(name)
                if new != before.keys.get(name) and new is not None and new.active:
                    assert held.covers(new.permission), f"{signer.pubkey} ({held}) granted {new.permission}"
            admins = [g for g in [*after.keys.values(), after.global_grant] if g and g.active and g.permission.is_admin]
            assert admins, "the database lost its last admin"
            assert after.permission_of(creator.pubkey) == Permission.admin(0)
        # A replica that verifies the same history reaches the same settings.
        result = replica.put_remote_entries(raw for _cid, raw in db.raw_entries())
        assert result.failed == {} and not result.unverified
        assert replica.open_database(db.id).settings().auth() == db.settings().auth()


# ---- defect 2: a revoked key writing on parents from before its revocation ---------------


def _revoked_writer(make_instance: InstanceFactory) -> tuple[Instance, Any, SigningKey, list[bytes]]:
    owner = make_instance()
    db = owner.create_database(name="notes")
    writer = SigningKey.generate()
    with db.transaction() as txn:
        txn.settings().add_key(writer.pubkey, Permission.write(10))
    with db.with_key(writer).transaction() as txn:
        txn.doc("notes").set("title", "by the writer")
    old_parents = db.tip_cids()
    with db.transaction() as txn:
        txn.settings().revoke_key(writer.pubkey)
    with db.transaction() as txn:
        txn.doc("notes").set("body", "after the revocation")
    return owner, db, writer, old_parents


def test_a_revoked_key_on_old_parents_does_not_show_and_is_not_built_on(make_instance: InstanceFactory) -> None:
    owner, db, writer, old_parents = _revoked_writer(make_instance)
    late = wire_entry(db, writer, {"notes": {"title": "rewritten after revocation"}}, parents=old_parents)
    result = owner.put_remote_entries([late.raw])
    # Verified (its own past holds no revocation; every node agrees on that) ...
    assert result.verified == [late.cid] and db.status_of(late.cid) is Status.VERIFIED
    assert late.id in db.tips()  # ... and still offered to peers,
    # ... but it counts nowhere: reads, the next commit's parents.
    assert db.doc("notes").get("title") == "by the writer"
    assert late.id not in db.effective_tips()
    with db.transaction() as txn:
        txn.doc("notes").set("next", 1)
    assert txn.entry is not None and late.cid not in txn.entry.parents
    assert db.doc("notes").get("title") == "by the writer"
    # A replica that gets everything in another order reads the same.
    other = make_instance()
    raws = [raw for _cid, raw in db.raw_entries()]
    other.put_remote_entries(reversed(raws))
    other.put_remote_entries(raws)
    copy = other.open_database(db.id)
    assert copy.doc("notes").to_dict() == db.doc("notes").to_dict()
    assert copy.effective_tips() == db.effective_tips()


def test_a_revoked_admin_cannot_leave_a_puppet_admin_behind(make_instance: InstanceFactory) -> None:
    owner = make_instance()
    db, deposed = with_admin(owner)
    old_parents = db.tip_cids()
    with db.transaction() as txn:
        txn.settings().revoke_key(deposed.pubkey)
    puppet = SigningKey.generate()
    planted = wire_entry(db, deposed, {"_settings": {"auth": {"keys": {puppet.pubkey: grant("admin:5")}}}}, old_parents)
    assert owner.put_remote_entries([planted.raw]).verified == [planted.cid]
    settings_now = db.settings().auth()
    assert settings_now.permission_of(puppet.pubkey) is None
    assert settings_now.permission_of(deposed.pubkey) is None
    # The puppet writing on the planted branch alone: Verified there, but it never shows.
    on_branch = wire_entry(db, puppet, {"notes": {"owned": True}}, [planted.cid])
    assert owner.put_remote_entries([on_branch.raw]).verified == [on_branch.cid]
    assert db.doc("notes").get("owned") is None
    # The puppet merging the branch with the present: its pin holds the revocation: Failed.
    merged = wire_entry(db, puppet, {"notes": {"owned": True}}, sorted({*db.tip_cids(), on_branch.cid}))
    result = owner.put_remote_entries([merged.raw])
    assert merged.id in result.failed and "no permission" in result.failed[merged.id]
    assert db.doc("notes").get("owned") is None


async def test_a_revoked_writer_pushing_over_http_does_not_show(make_instance: InstanceFactory) -> None:
    owner, db, writer, old_parents = _revoked_writer(make_instance)
    with db.transaction() as txn:  # public for reading, so even a revoked key can push
        txn.settings().set_global(Permission.read())
    late = wire_entry(db, writer, {"notes": {"title": "rewritten after revocation"}}, parents=old_parents)
    async with AsyncExitStack() as stack:
        url = await _serve(stack, owner)
        answer = await _post(url, SendEntries(db.root_cid, (late.raw,)))
        assert isinstance(answer, Count) and answer.received == 1
    assert db.doc("notes").get("title") == "by the writer"


# ---- defect 9 (dag): values bounded in depth -----------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


def test_a_value_past_the_depth_limit_is_refused_at_write(instance: Instance) -> None:
    db = instance.create_database()
    with db.transaction() as txn:
        txn.doc("d").set("ok", _nested(MAX_VALUE_DEPTH - 1))
    for value in (_nested(MAX_VALUE_DEPTH), [_nested(MAX_VALUE_DEPTH)], _nested(5_000)):
        with pytest.raises(InvalidValueError, match=r"nested deeper than 64 levels"), db.transaction() as txn:
            txn.doc("d").set("deep", value)
    with pytest.raises(InvalidValueError, match=r"nested deeper"), db.transaction() as txn:
        txn.doc("d").set(".".join(["p"] * (MAX_VALUE_DEPTH + 1)), 1)
    with pytest.raises(InvalidValueError, match=r"nested deeper"), db.transaction() as txn:
        txn.table("t").insert({"row": _nested(MAX_VALUE_DEPTH)})


def test_a_deep_value_from_a_peer_never_breaks_reads_or_settings(make_instance: InstanceFactory) -> None:
    owner = make_instance()
    db = owner.create_database(name="deep")
    with db.transaction() as txn:
        txn.doc("d").set("fine", 1)
    key = owner.device_key
    deep_data = wire_entry(db, key, {"d": {"deep": _nested(800)}})
    result = owner.put_remote_entries([deep_data.raw])
    assert deep_data.id in result.failed and "nested deeper than 64" in result.failed[deep_data.id]
    assert db.doc("d").to_dict() == {"fine": 1}
    deep_settings = wire_entry(db, key, {"_settings": {"junk": _nested(600)}})
    result = owner.put_remote_entries([deep_settings.raw])
    assert deep_settings.id in result.failed and "nested deeper" in result.failed[deep_settings.id]
    assert db.name == "deep"


def test_values_at_the_limit_written_here_verify_everywhere(make_instance: InstanceFactory) -> None:
    """The write check and the receive check count depth the same way: no fork at the edge."""
    owner, replica = make_instance(), make_instance()
    db = owner.create_database()
    with db.transaction() as txn:
        txn.doc("d").set("edge", _nested(MAX_VALUE_DEPTH - 1))
        txn.doc("d").set("list", [[_nested(MAX_VALUE_DEPTH - 3)]])
        txn.table("t").insert(_nested(MAX_VALUE_DEPTH - 1))
    result = replica.put_remote_entries(raw for _cid, raw in db.raw_entries())
    assert result.failed == {} and len(result.verified) == 2
    assert replica.open_database(db.id).doc("d").to_dict() == db.doc("d").to_dict()
