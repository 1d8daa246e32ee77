"""Permissions and the rules that decide whether a key may write.

A database's `_settings` document holds ``auth``:

    auth.keys.<pubkey> = {"name": str?, "permissions": "admin:0" | "write:10" | "read",
                          "status": "active" | "revoked"}
    auth.global        = {"permissions": ..., "status": ...}   (any key at all)

Admin outranks Write outranks Read; within a kind, a lower priority number is stronger.
Writing `_settings` needs Admin, writing anything else needs Write. An admin may not grant
more than it holds, nor change or revoke a key stronger than itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .crdt.doc import TOMBSTONE, DocDelta
from .entry import SETTINGS_STORE
from .errors import InvalidValueError, PermissionDeniedError


class Kind(Enum):
    READ = 0
    WRITE = 1
    ADMIN = 2


@dataclass(frozen=True, slots=True, order=False)
class Permission:
    """Admin(p), Write(p) or Read. ``priority`` is 0 for Read."""

    kind: Kind
    priority: int = 0

    @classmethod
    def admin(cls, priority: int = 0) -> Permission:
        return cls(Kind.ADMIN, _priority(priority))

    @classmethod
    def write(cls, priority: int = 0) -> Permission:
        return cls(Kind.WRITE, _priority(priority))

    @classmethod
    def read(cls) -> Permission:
        return cls(Kind.READ, 0)

    @classmethod
    def parse(cls, text: object) -> Permission:
        """Parse ``admin:N``, ``write:N`` or ``read``; raises :class:`InvalidValueError`."""
        if text == "read":
            return cls.read()
        if isinstance(text, str) and ":" in text:
            kind, _, number = text.partition(":")
            if kind in ("admin", "write") and number.isdigit() and str(int(number)) == number:
                return cls(Kind.ADMIN if kind == "admin" else Kind.WRITE, _priority(int(number)))
        raise InvalidValueError(f"not a permission: {text!r} (use admin:N, write:N or read)")

    def __str__(self) -> str:
        return "read" if self.kind is Kind.READ else f"{self.kind.name.lower()}:{self.priority}"

    @property
    def strength(self) -> tuple[int, int]:
        """Larger is stronger: kind first, then the lower priority number."""
        return (self.kind.value, -self.priority)

    def covers(self, other: Permission) -> bool:
        return self.strength >= other.strength

    @property
    def can_write(self) -> bool:
        return self.kind in (Kind.WRITE, Kind.ADMIN)

    @property
    def is_admin(self) -> bool:
        return self.kind is Kind.ADMIN


def _priority(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise InvalidValueError(f"priority must be an integer in 0..2^32-1, got {value!r}")
    return value


ACTIVE = "active"
REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class KeyGrant:
    permission: Permission
    status: str
    name: str | None = None

    @property
    def active(self) -> bool:
        return self.status == ACTIVE


def _grant(value: object) -> KeyGrant | None:
    """A grant from settings data; malformed grants count as absent (they grant nothing)."""
    if not isinstance(value, Mapping):
        return None
    try:
        permission = Permission.parse(value.get("permissions"))
    except InvalidValueError:
        return None
    status = value.get("status", ACTIVE)
    if status not in (ACTIVE, REVOKED):
        return None
    name = value.get("name")
    return KeyGrant(permission, status, name if isinstance(name, str) else None)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """The ``auth`` part of a settings state, parsed."""

    keys: Mapping[str, KeyGrant]
    global_grant: KeyGrant | None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> AuthSettings:
        auth = settings.get("auth")
        if not isinstance(auth, Mapping):
            return cls({}, None)
        raw_keys = auth.get("keys")
        grants = {}
        if isinstance(raw_keys, Mapping):
            for pubkey, value in raw_keys.items():
                grant = _grant(value)
                if grant is not None:
                    grants[pubkey] = grant
        return cls(grants, _grant(auth.get("global")))

    @property
    def configured(self) -> bool:
        """Whether the database restricts anything at all."""
        return bool(self.keys) or self.global_grant is not None

    def permission_of(self, pubkey: str) -> Permission | None:
        """The strongest active permission ``pubkey`` holds, directly or through global."""
        best = None
        grant = self.keys.get(pubkey)
        if grant is not None and grant.active:
            best = grant.permission
        global_grant = self.global_grant
        if (
            global_grant is not None
            and global_grant.active
            and (best is None or global_grant.permission.strength > best.strength)
        ):
            best = global_grant.permission
        return best


def check_write(auth: AuthSettings, pubkey: str, stores: Mapping[str, Any]) -> None:
    """Raise :class:`PermissionDeniedError` unless ``pubkey`` may write ``stores``.

    ``stores`` maps each store name the entry touches to its decoded delta (a
    :class:`DocDelta` for `_settings`), so that grants inside a settings change can be
    checked against the writer's own rank.
    """
    if not auth.configured:
        return
    held = auth.permission_of(pubkey)
    if held is None or not held.can_write:
        raise PermissionDeniedError(
            f"key {pubkey} has {'no permission' if held is None else str(held)}; writing needs write or admin",
            pubkey=pubkey,
        )
    if SETTINGS_STORE not in stores:
        return
    if not held.is_admin:
        raise PermissionDeniedError(f"key {pubkey} has {held}; changing _settings needs admin", pubkey=pubkey)
    delta = stores[SETTINGS_STORE]
    if isinstance(delta, DocDelta):
        _check_grant_changes(auth, held, pubkey, delta)


def _check_grant_changes(auth: AuthSettings, held: Permission, pubkey: str, delta: DocDelta) -> None:
    auth_delta = delta.fields.get("auth")
    if auth_delta is None:
        return
    if not isinstance(auth_delta, DocDelta) or auth_delta.atomic:
        # Replacing the whole auth section: only the strongest admin may.
        if held.strength < Permission.admin(0).strength:
            raise PermissionDeniedError(f"key {pubkey} ({held}) cannot replace the whole auth section", pubkey=pubkey)
        return
    changes: list[tuple[KeyGrant | None, Any]] = []
    keys_delta = auth_delta.fields.get("keys")
    if isinstance(keys_delta, DocDelta):
        for target, node in keys_delta.fields.items():
            changes.append((auth.keys.get(target), node))
    elif keys_delta is not None:
        for grant in auth.keys.values():
            changes.append((grant, TOMBSTONE))
    if "global" in auth_delta.fields:
        changes.append((auth.global_grant, auth_delta.fields["global"]))
    for old, node in changes:
        if old is not None and old.permission.strength > held.strength:
            raise PermissionDeniedError(
                f"key {pubkey} ({held}) cannot change a stronger key ({old.permission})", pubkey=pubkey
            )
        new_permission = _permission_in(node)
        if new_permission is not None and new_permission.strength > held.strength:
            raise PermissionDeniedError(f"key {pubkey} ({held}) cannot grant {new_permission}", pubkey=pubkey)


def _permission_in(node: Any) -> Permission | None:
    if isinstance(node, DocDelta):
        try:
            return Permission.parse(node.fields.get("permissions"))
        except InvalidValueError:
            return None
    return None
