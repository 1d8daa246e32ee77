"""Access administration on the serving side: the requests peers left, and an admin's decision.

Kept apart from the engine: deciding a request is a settings commit and a row in
``_sync``, with no network and no scheduling (the approved peer is dialled later because
its key is now named in the settings, see ``Sync._dialled``).
"""

from __future__ import annotations

from collections.abc import Callable

from dag import Instance, NotFoundError, Permission

from .state import AccessRequest, SyncState


class AccessAdmin:
    """Lists, approves and rejects access requests with this node's key."""

    def __init__(self, instance: Instance, state: SyncState, now_ms: Callable[[], int]) -> None:
        self._instance = instance
        self._state = state
        self._now_ms = now_ms

    def requests(self, status: str | None = None) -> list[AccessRequest]:
        return self._state.access_requests(status)

    def approve(self, request_id: str) -> AccessRequest:
        """Grant the request with this node's key (it must be an admin of that database)."""
        request = next((r for r in self._state.access_requests() if r.request_id == request_id), None)
        if request is None:
            raise NotFoundError(f"no access request {request_id}")
        db = self._instance.open_database(request.db)
        with db.transaction() as txn:
            txn.settings().add_key(request.key, Permission.parse(request.permission))
        return self._state.decide_request(request_id, "approved", self._now_ms())

    def reject(self, request_id: str) -> AccessRequest:
        return self._state.decide_request(request_id, "rejected", self._now_ms())


__all__ = ["AccessAdmin"]
