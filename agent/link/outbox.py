"""The outbox: what the device must not lose sits in SQLite until the controller's application-level ack.

A broker PUBACK is not durability (Mosquitto drops queued messages past its limits and loses unsaved ones on
a crash), so every message here is kept, and re-sent, until an :class:`~protocols.messages.Ack` names it
(DESIGN.md §5). Invariants:

- Each message has an id (a report's ``report_id``; an audit batch's key); putting the same id twice stores it
  once, and the controller handles re-sends idempotently, so a message is *stored* there exactly once however
  often it is sent.
- Messages are sent in the order they were put; an unacked message is re-sent on every new connection and,
  while connected, after ``resend_after_s`` doubling up to ``resend_max_s`` (a controller that is down does not
  get a storm).
- Memory is bounded: the sender reads a small window of due rows at a time, never the whole outbox, and at most
  ``max_outbox_messages`` wait for acks (past that :class:`~agent.errors.OutboxFullError`, never a silent drop).
- A message that cannot be delivered — larger than the broker's maximum packet size, or in flight on
  ``max_send_attempts`` consecutive connections that died — is set aside as ``undeliverable`` (kept on disk,
  an event recorded), so it can neither block the messages behind it nor cause a reconnect loop. (The audit
  uploader deletes its own undeliverable batches and rebuilds them smaller from ``registry.db``.)
- Every queued message carries the current device key's signature: after a re-enrollment under the same id,
  :meth:`Outbox.reseal` drops audit batches signed with another key (rebuilt from ``registry.db``) and re-signs
  reports (the link does it before it connects, the audit uploader before its first batch).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agent.errors import OutboxFullError
from agent.link.store import LinkStore
from protocols.audit import AuditHead
from protocols.envelope import resign_own
from protocols.errors import ProtocolError
from protocols.keys import Ed25519PrivateKey, keyid
from protocols.topics import TopicKind

__all__ = ["Outbox", "OutboxItem", "audit_ack_key"]


def audit_ack_key(head: AuditHead) -> str:
    """The outbox id of an audit batch whose last record is ``head`` (what an audit ack names)."""
    return f"audit:{head.epoch}:{head.seq}:{head.hash}"


def _checkpoint_keyid(payload: bytes) -> str | None:
    """The key id of an audit batch's checkpoint signature (None if it cannot be read)."""
    try:
        found = json.loads(payload)["checkpoint"]["keyid"]
    except (ValueError, KeyError, TypeError):
        return None
    return found if isinstance(found, str) else None


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One message waiting for its ack."""

    seq: int
    msg_id: str
    kind: TopicKind
    payload: bytes
    attempts: int
    strikes: int


class Outbox:
    """The outbox over :class:`LinkStore` (all SQLite work on the store's thread)."""

    def __init__(
        self,
        store: LinkStore,
        *,
        max_messages: int = 10_000,
        resend_after: float = 30.0,
        resend_max: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.max_messages = max_messages
        self.resend_after = resend_after
        self.resend_max = resend_max
        self.clock = clock
        self.wake = asyncio.Event()
        """Set when a message is put (the sender waits on it)."""

    # --- producers --------------------------------------------------------------------------------------

    async def put(self, kind: TopicKind, msg_id: str, payload: bytes) -> bool:
        """Store a message until it is acked; False if a message with this id is stored already.

        Raises:
            OutboxFullError: ``max_messages`` messages wait for acks already.
        """
        added = await self.store.run(self._put, kind, msg_id, payload)
        self.wake.set()
        return added

    async def put_own(self, kind: TopicKind, msg_id: str, payload: bytes) -> bool:
        """:meth:`put` past ``max_messages``: for the link's own few notices (one per rare event), which must
        not be refused, and whose refusal would leave the link unable to record what happened."""
        added = await self.store.run(self._put, kind, msg_id, payload, True)
        self.wake.set()
        return added

    def put_in_transaction(self, kind: TopicKind, msg_id: str, payload: bytes) -> bool:
        """:meth:`put_own` for callers already on the store's thread inside their own transaction.

        Lets a state change and the report about it commit together (see :mod:`agent.link.dispatch`); these
        reports are bounded by the number of assignments, so the cap does not apply to them.
        The caller sets :attr:`wake` after its commit.
        """
        return self._insert(kind, msg_id, payload, force=True)

    def _put(self, kind: TopicKind, msg_id: str, payload: bytes, force: bool = False) -> bool:
        with self.store.transaction():
            return self._insert(kind, msg_id, payload, force=force)

    def _insert(self, kind: TopicKind, msg_id: str, payload: bytes, *, force: bool = False) -> bool:
        db = self.store.db
        if db.execute("SELECT 1 FROM outbox WHERE msg_id = ?", [msg_id]).fetchone() is not None:
            return False
        (waiting,) = db.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()
        if waiting >= self.max_messages and not force:
            raise OutboxFullError(f"{waiting} messages wait for the controller's ack; refusing more")
        db.execute(
            "INSERT INTO outbox (msg_id, kind, payload, created_ts) VALUES (?, ?, ?, ?)",
            [msg_id, str(kind), payload, self.clock()],
        )
        return True

    # --- a new device key -------------------------------------------------------------------------------

    async def reseal(self, key: Ed25519PrivateKey) -> tuple[int, int]:
        """Make every queued message carry ``key``'s signature; returns ``(audit batches dropped, reports
        re-signed)``.

        After the device is re-enrolled under the same id (new key, ``link.db`` kept), a message signed with the
        old key is refused by the controller forever and, for an audit batch, blocks the uploader. Audit batches
        whose checkpoint another key signed are deleted (the uploader rebuilds them from ``registry.db`` and signs
        them anew); reports are re-signed (same payload: same ``report_id``, so the controller still handles a
        copy that arrived before idempotently). Undeliverable messages are left as they are. Idempotent.
        """
        return await self.store.run(self._reseal, key)

    def _reseal(self, key: Ed25519PrivateKey) -> tuple[int, int]:
        kid = keyid(key)
        dropped = resealed = 0
        with self.store.transaction():
            db = self.store.db
            rows = db.execute(
                "SELECT msg_id, kind FROM outbox WHERE state = 'pending' AND kind IN (?, ?) ORDER BY seq",
                [str(TopicKind.AUDIT), str(TopicKind.REPORT)],
            ).fetchall()
            for msg_id, kind in rows:  # one payload in memory at a time
                (payload,) = db.execute("SELECT payload FROM outbox WHERE msg_id = ?", [msg_id]).fetchone()
                if kind == str(TopicKind.AUDIT):
                    if _checkpoint_keyid(bytes(payload)) != kid:
                        db.execute("DELETE FROM outbox WHERE msg_id = ?", [msg_id])
                        dropped += 1
                    continue
                try:
                    fresh = resign_own(bytes(payload), [key])
                except (ProtocolError, ValueError):
                    continue  # cannot be read: the controller refuses it either way, as before
                if fresh is not None:
                    db.execute("UPDATE outbox SET payload = ?, next_ts = 0 WHERE msg_id = ?", [fresh, msg_id])
                    resealed += 1
            if dropped or resealed:
                self.store.add_event(
                    "outbox_resealed", {"keyid": kid, "audit_dropped": dropped, "reports_resigned": resealed}
                )
        if dropped or resealed:
            self.wake.set()
        return dropped, resealed

    # --- the sender -------------------------------------------------------------------------------------

    async def due(self, limit: int = 16) -> list[OutboxItem]:
        """Up to ``limit`` pending messages whose (re)send time has come, oldest first."""
        return await self.store.run(self._due, limit)

    def _due(self, limit: int) -> list[OutboxItem]:
        rows = self.store.db.execute(
            "SELECT seq, msg_id, kind, payload, attempts, strikes FROM outbox "
            "WHERE state = 'pending' AND next_ts <= ? ORDER BY seq LIMIT ?",
            [self.clock(), limit],
        ).fetchall()
        return [OutboxItem(r[0], r[1], TopicKind(r[2]), bytes(r[3]), r[4], r[5]) for r in rows]

    async def next_due_in(self) -> float | None:
        """Seconds until the next pending message is due (0 if one is due now), None if none is pending."""
        return await self.store.run(self._next_due_in)

    def _next_due_in(self) -> float | None:
        (next_ts,) = self.store.db.execute("SELECT min(next_ts) FROM outbox WHERE state = 'pending'").fetchone()
        return None if next_ts is None else max(0.0, next_ts - self.clock())

    async def resend_all(self) -> None:
        """Make every pending message due now (on each new connection)."""
        await self.store.run(self._write, "UPDATE outbox SET next_ts = 0 WHERE state = 'pending'", [])
        self.wake.set()

    async def begin_send(self, item: OutboxItem) -> int:
        """Count one more connection on which ``item`` goes out *before* sending it; returns that count.

        The count is reset by :meth:`sent` (the broker's PUBACK). If the process or the connection dies in
        between, it stays: that is how a message that kills every connection it is sent on is recognised.
        """
        await self.store.run(self._write, "UPDATE outbox SET strikes = strikes + 1 WHERE msg_id = ?", [item.msg_id])
        return item.strikes + 1

    async def sent(self, item: OutboxItem) -> None:
        """The broker accepted ``item`` (PUBACK): schedule its re-send in case no ack comes."""
        attempts = item.attempts + 1
        delay = min(self.resend_max, self.resend_after * 2.0 ** min(attempts - 1, 30))
        await self.store.run(
            self._write,
            "UPDATE outbox SET strikes = 0, attempts = ?, next_ts = ? WHERE msg_id = ?",
            [attempts, self.clock() + delay, item.msg_id],
        )

    async def set_undeliverable(self, item: OutboxItem, reason: str) -> None:
        """Set ``item`` aside (kept on disk, never sent again) and record an event saying why."""
        await self.store.run(self._set_undeliverable, item, reason)

    def _set_undeliverable(self, item: OutboxItem, reason: str) -> None:
        with self.store.transaction():
            self.store.db.execute(
                "UPDATE outbox SET state = 'undeliverable', error = ? WHERE msg_id = ?", [reason, item.msg_id]
            )
            self.store.add_event(
                "outbox_undeliverable",
                {"msg_id": item.msg_id, "kind": str(item.kind), "bytes": len(item.payload), "reason": reason},
                now=self.clock(),
            )

    # --- acks -------------------------------------------------------------------------------------------

    async def acked(self, msg_ids: Iterable[str]) -> int:
        """Delete the messages the controller acked; returns how many were here."""
        ids = list(msg_ids)
        if not ids:
            return 0
        return await self.store.run(self._acked, ids)

    def _acked(self, ids: list[str]) -> int:
        with self.store.transaction():
            marks = ",".join("?" * len(ids))
            cursor = self.store.db.execute(f"DELETE FROM outbox WHERE msg_id IN ({marks})", ids)  # noqa: S608
            return int(cursor.rowcount)

    # --- inspection -------------------------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        """``{"pending": n, "undeliverable": m}``."""
        return await self.store.run(self._counts)

    def _counts(self) -> dict[str, int]:
        rows = self.store.db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall()
        return {"pending": 0, "undeliverable": 0, **{state: n for state, n in rows}}

    async def items(self, state: str = "pending", limit: int = 100) -> list[dict[str, Any]]:
        """Rows (without payloads) for inspection, oldest first."""
        return await self.store.run(self._items, state, limit)

    def _items(self, state: str, limit: int) -> list[dict[str, Any]]:
        return list(
            self.store.db.query(
                "SELECT seq, msg_id, kind, length(payload) AS bytes, created_ts, attempts, strikes, state, error "
                "FROM outbox WHERE state = ? ORDER BY seq LIMIT ?",
                [state, limit],
            )
        )

    def _write(self, sql: str, params: list[Any]) -> None:
        with self.store.transaction():
            self.store.db.execute(sql, params)
