"""Permissions and the rules that decide whether a key may write.

A database's `_settings` document holds ``auth``:

    auth.keys.<pubkey> = {"name": str?, "permissions": "admin:0" | "write:10" | "read",
                          "status": "active" | "revoked"}
    auth.global        = {"permissions": ..., "status": ...}   (any key at all)

Admin outranks Write outranks Read; within a kind, a lower priority number is stronger.
Writing `_settings` needs Admin, writing anything else needs Write. A settings change is
judged by the settings it results in (``check_auth_change``): an admin grants at most what
it holds, never touches a stronger key, never drops, revokes or weakens one as strong as
itself, and never leaves the database without an admin.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .crdt.doc import DocDelta, apply_doc_delta
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


def check_write(
    settings: Mapping[str, Any], pubkey: str, stores: Mapping[str, Any], auth: AuthSettings | None = None
) -> None:
    """Raise :class:`PermissionDeniedError` unless ``pubkey`` may write ``stores``.

    ``settings`` is the `_settings` state the write is judged against (the state before
    it), ``auth`` its parsed ``auth`` section when the caller has it cached. ``stores``
    maps each store name the entry touches to its decoded delta (a :class:`DocDelta` for
    `_settings`). A settings change is judged by the settings it results in: the delta is
    applied to ``settings`` and the key sets before and after are compared, so a delta
    that replaces ``auth`` (or ``auth.keys``) wholesale is held to the same rules as one
    that names each key.
    """
    if auth is None:
        auth = AuthSettings.from_settings(settings)
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
        after: dict[str, Any] = dict(settings)
        apply_doc_delta(after, delta)  # path copying: ``settings`` itself is not changed
        check_auth_change(auth, AuthSettings.from_settings(after), held, pubkey)


GLOBAL = "*"  # how the global grant is named in refusals and in the comparison below


def check_auth_change(before: AuthSettings, after: AuthSettings, held: Permission, pubkey: str) -> None:
    """Raise :class:`PermissionDeniedError` unless an admin holding ``held`` may turn
    ``before`` into ``after``.

    The rules, on every grant that differs (added, dropped, or changed in permission,
    status or name), the global grant included:
    1. a grant stronger than ``held`` is not touched at all;
    2. no grant ends stronger than ``held`` (an admin grants at most what it holds);
    3. an active grant as strong as ``held`` (the writer's own included) is neither dropped,
       revoked nor weakened: admins of one rank cannot depose each other;
    4. a database that had an active admin keeps one.
    """
    old_grants: dict[str, KeyGrant | None] = {**before.keys, GLOBAL: before.global_grant}
    new_grants: dict[str, KeyGrant | None] = {**after.keys, GLOBAL: after.global_grant}
    changed = [
        (name, old_grants.get(name), new_grants.get(name))
        for name in sorted(old_grants.keys() | new_grants.keys())
        if old_grants.get(name) != new_grants.get(name)
    ]
    # The rules in turn, each over every change, so the refusal names the gravest breach.
    for name, old, _new in changed:
        if old is not None and old.permission.strength > held.strength:
            who = "the global grant" if name == GLOBAL else "a stronger key"
            raise PermissionDeniedError(f"key {pubkey} ({held}) cannot change {who} ({old.permission})", pubkey=pubkey)
    for _name, _old, new in changed:
        if new is not None and new.active and new.permission.strength > held.strength:
            raise PermissionDeniedError(f"key {pubkey} ({held}) cannot grant {new.permission}", pubkey=pubkey)
    for name, old, new in changed:
        old_power, new_power = _active(old), _active(new)
        weakened = new_power is None or (old_power is not None and new_power.strength < old_power.strength)
        if old_power is not None and old_power.strength >= held.strength and weakened:
            target = "the global grant" if name == GLOBAL else ("itself" if name == pubkey else f"key {name}")
            raise PermissionDeniedError(
                f"key {pubkey} ({held}) cannot drop, revoke or weaken {target} ({old_power}): "
                "only a stronger admin may",
                pubkey=pubkey,
            )
    if _has_admin(before) and not _has_admin(after):
        raise PermissionDeniedError(
            f"key {pubkey} ({held}): this change would leave the database without an active admin", pubkey=pubkey
        )


def _active(grant: KeyGrant | None) -> Permission | None:
    return grant.permission if grant is not None and grant.active else None


def _has_admin(auth: AuthSettings) -> bool:
    grants = [*auth.keys.values(), auth.global_grant]
    return any(grant is not None and grant.active and grant.permission.is_admin for grant in grants)
