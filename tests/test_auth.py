"""Permissions: who may commit what, and nothing written by a refused commit."""

from __future__ import annotations

from typing import Any

import pytest

from dag import Database, Instance, InvalidValueError, Permission, PermissionDeniedError, SigningKey, Status
from dag.auth import AuthSettings
from tests.conftest import InstanceFactory
from tests.forge import forge


def _copy(source: Instance, target: Instance) -> None:
    for db in source.databases():
        target.put_remote_entries([raw for _cid, raw in db.raw_entries()])


def test_permission_order() -> None:
    assert Permission.admin(5).covers(Permission.write(0))
    assert Permission.write(0).covers(Permission.write(3))
    assert not Permission.write(3).covers(Permission.write(0))
    assert Permission.write(100).covers(Permission.read())
    assert Permission.parse("admin:0") == Permission.admin(0)
    assert str(Permission.write(7)) == "write:7"
    for bad in ("admin", "write:-1", "write:01", "owner:1", 3):
        with pytest.raises(InvalidValueError):
            Permission.parse(bad)


def test_creator_is_admin_zero(instance: Instance) -> None:
    db = instance.create_database(name="n")
    auth = db.settings().auth()
    assert auth.permission_of(instance.device_id) == Permission.admin(0)


def test_write_key_cannot_touch_settings(instance: Instance) -> None:
    db = instance.create_database()
    writer = SigningKey.generate()
    with db.transaction() as txn:
        txn.settings().add_key(writer.pubkey, Permission.write(10))
    as_writer = db.with_key(writer)
    with as_writer.transaction() as txn:
        txn.doc("d").set("ok", 1)
    tips = db.tips()
    with pytest.raises(PermissionDeniedError, match=r"changing _settings needs admin"), as_writer.transaction() as txn:
        txn.settings().set_database_name("mine")
    assert db.tips() == tips
    assert db.name is None


def test_reader_cannot_commit(instance: Instance) -> None:
    db = instance.create_database()
    reader = SigningKey.generate()
    with db.transaction() as txn:
        txn.settings().add_key(reader.pubkey, Permission.read())
    tips = db.tips()
    as_reader = db.with_key(reader)
    with (
        pytest.raises(PermissionDeniedError, match=r"has read; writing needs write or admin"),
        as_reader.transaction() as txn,
    ):
        txn.doc("d").set("x", 1)
    assert db.tips() == tips and len(db) == 2


def test_unknown_key_cannot_commit(instance: Instance) -> None:
    db = instance.create_database()
    stranger = SigningKey.generate()
    as_stranger = db.with_key(stranger)
    with pytest.raises(PermissionDeniedError, match=r"has no permission"), as_stranger.transaction() as txn:
        txn.doc("d").set("x", 1)


def test_global_write_lets_anyone_write(instance: Instance) -> None:
    db = instance.create_database()
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(50))
    with db.with_key(SigningKey.generate()).transaction() as txn:
        txn.doc("d").set("x", 1)
    assert db.doc("d").get("x") == 1


def test_revoked_key_cannot_commit_and_its_forged_entries_fail(make_instance: InstanceFactory) -> None:
    owner = make_instance()
    db = owner.create_database()
    writer = SigningKey.generate()
    with db.transaction() as txn:
        txn.settings().add_key(writer.pubkey, Permission.write(10))
    # The writer has its own replica; it receives the revocation, then writes anyway with
    # a commit path that skips the local check (as a malicious node would).
    writer_node = make_instance(writer)
    _copy(owner, writer_node)
    with db.transaction() as txn:
        txn.settings().revoke_key(writer.pubkey)
    with pytest.raises(PermissionDeniedError), db.with_key(writer).transaction() as txn:
        txn.doc("d").set("x", 1)
    _copy(owner, writer_node)
    wdb = writer_node.open_database(db.id, key=writer)
    assert wdb.settings().auth().permission_of(writer.pubkey) is None
    forged = _forge_commit(wdb, {"d": {"x": 1}})
    result = owner.put_remote_entries([forged])
    assert list(result.failed.values()) == [f"key {writer.pubkey} has no permission; writing needs write or admin"]
    assert db.doc("d").to_dict() == {}


def _forge_commit(db: Database, stores: dict[str, dict[str, Any]]) -> bytes:
    """Commit bypassing the local permission check: what a hostile peer can send."""
    return forge(db, db.signer, stores).raw


def test_write_key_settings_change_fails_verification(make_instance: InstanceFactory) -> None:
    owner = make_instance()
    db = owner.create_database()
    writer = SigningKey.generate()
    with db.transaction() as txn:
        txn.settings().add_key(writer.pubkey, Permission.write(10))
    writer_node = make_instance(writer)
    _copy(owner, writer_node)
    forged = _forge_commit(writer_node.open_database(db.id, key=writer), {"_settings": {"name": "stolen"}})
    result = owner.put_remote_entries([forged])
    assert len(result.failed) == 1 and "needs admin" in next(iter(result.failed.values()))
    assert db.name is None


def test_admin_cannot_grant_above_itself(instance: Instance) -> None:
    db = instance.create_database()
    junior = SigningKey.generate()
    with db.transaction() as txn:
        txn.settings().add_key(junior.pubkey, Permission.admin(5))
    as_junior = db.with_key(junior)
    with as_junior.transaction() as txn:
        txn.settings().add_key(SigningKey.generate().pubkey, Permission.write(0))
    with pytest.raises(PermissionDeniedError, match=r"cannot grant admin:1"), as_junior.transaction() as txn:
        txn.settings().add_key(SigningKey.generate().pubkey, Permission.admin(1))
    with pytest.raises(PermissionDeniedError, match=r"cannot change a stronger key"), as_junior.transaction() as txn:
        txn.settings().revoke_key(instance.device_id)


def test_auth_parsing_ignores_malformed_grants() -> None:
    auth = AuthSettings.from_settings(
        {"auth": {"keys": {"k1": {"permissions": "bogus"}, "k2": {"permissions": "write:1", "status": "revoked"}}}}
    )
    assert auth.permission_of("k1") is None
    assert auth.permission_of("k2") is None


def test_remote_entries_are_verified(make_instance: InstanceFactory) -> None:
    owner, replica = make_instance(), make_instance()
    db = owner.create_database(name="shared")
    with db.transaction() as txn:
        txn.doc("d").set("a", 1)
    result = replica.put_remote_entries([raw for _cid, raw in db.raw_entries()])
    assert len(result.verified) == 2 and not result.failed and not result.unverified
    copy = replica.open_database(db.id)
    assert copy.status_counts() == {"unverified": 0, "verified": 2, "failed": 0}
    assert copy.status_of(copy.root_cid) is Status.VERIFIED


def test_granting_a_revoked_key_again_builds_on_its_left_out_tip(make_instance: InstanceFactory) -> None:
    """A writer's tip concurrent with its revocation is left out of the effective tips; an
    admin who grants the key again builds on that tip, so the grant is the only effective
    tip afterwards (a local commit always is), and the writer's write shows again."""
    owner = make_instance()
    db = owner.create_database()
    writer = SigningKey.generate()
    with db.transaction() as txn:
        txn.settings().add_key(writer.pubkey, Permission.write(10))
    writer_node = make_instance(writer)
    _copy(owner, writer_node)
    with writer_node.open_database(db.id, key=writer).transaction() as txn:
        txn.doc("d").set("x", 1)
    with db.transaction() as txn:  # concurrent with the writer's entry: it has not arrived yet
        txn.settings().revoke_key(writer.pubkey)
    _copy(writer_node, owner)
    assert len(db.tips()) == 2 and len(db.effective_tips()) == 1
    assert db.doc("d").to_dict() == {}
    with db.transaction() as txn:
        txn.settings().add_key(writer.pubkey, Permission.write(10))
    entry = txn.entry
    assert entry is not None
    assert db.effective_tips() == db.tips() == [entry.id]
    assert len(entry.parents) == 2
    assert db.doc("d").to_dict() == {"x": 1}
    replica = make_instance()
    _copy(owner, replica)
    assert replica.open_database(db.id).effective_tips() == [entry.id]
