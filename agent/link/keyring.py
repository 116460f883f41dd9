"""The controller keys a device trusts for assignments and acks, kept current through TUF.

DESIGN.md §4: the controller's assignment keys are published as the TUF target ``keys/assignments.json``
(:class:`~protocols.releases.AssignmentKeyList`), so they rotate under TUF's rules — rollback and freeze
protection, threshold signatures of the targets role — instead of by re-enrolment.

Invariants:

- Until the repository publishes a key list, the keys are the enrollment bundle's. Once a verified list is seen
  it replaces them entirely: an assignment (or ack) signed only by a key no longer listed is refused.
- Only a list that came out of :meth:`ReleaseUpdater.assignment_keys` (TUF-verified) is adopted. It is cached in
  ``<link dir>/assignment-keys.json`` so that a restart without a connection keeps the rotated keys (the cache
  is local state, trusted like the enrollment next to it; TUF's own trusted metadata stops an older list from
  coming back on the next refresh).
- :meth:`run` refreshes the list when the link (re)connects, hourly, and when an assignment failed
  verification (:meth:`unverified`): a controller that rotated its key signs the next assignment with the new
  key, the device learns the new list, then verifies that assignment again — in its own task, never in the
  MQTT reader (the refresh itself needs the reader to deliver the metadata). An assignment refused while a
  refresh runs is answered by the next refresh, not by that one: its lookup may have read the repository before
  the new keys were published.
- A refresh that fails (link down, expired timestamp) keeps the current keys: serving and reconciling go on;
  a frozen repository cannot *add* a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import NoReturn

import structlog

from agent.link import KEYRING_FILE
from agent.link.updater import ReleaseError
from protocols.backoff import raise_if_cancelled
from protocols.errors import DecodeError
from protocols.keys import Ed25519PublicKey
from protocols.releases import AssignmentKeyList, decode_assignment_keys

__all__ = ["KEYRING_FILE", "ControllerKeyring"]

log = structlog.get_logger(__name__)

RETRY_AFTER_FAILED_REFRESH_S = 30.0
"""Seconds before a failed refresh is tried again while a refused assignment waits for new keys."""


class ControllerKeyring:
    """The current controller keys and threshold (see the module docstring)."""

    def __init__(self, enrolled: Mapping[str, Ed25519PublicKey], threshold: int, cache: Path | None = None) -> None:
        self._enrolled = (dict(enrolled), threshold)
        self.cache = cache
        self.listing: AssignmentKeyList | None = None
        """The TUF-verified list in force (None: the enrollment keys)."""
        self._current = self._enrolled
        self.stale = asyncio.Event()
        """Set when the keys should be refreshed now (an assignment did not verify)."""
        self.settled = asyncio.Event()
        """Set when no refresh the link asked for is pending: the link clears it on a connect (with :attr:`stale`)
        and holds the assignments received until :meth:`run` has refreshed (or failed to)."""
        self.settled.set()
        self._retry: bytes | None = None
        if cache is not None:
            self._load(cache)

    def _load(self, cache: Path) -> None:
        try:
            listing = decode_assignment_keys(cache.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, DecodeError) as exc:
            log.warning("keyring.cache_unusable", path=str(cache), error=str(exc))
            return
        self.listing = listing
        self._current = (listing.public_keys(), listing.threshold)

    @property
    def current(self) -> tuple[dict[str, Ed25519PublicKey], int]:
        """The keys and their threshold, read together: :meth:`adopt` may swap them on a worker thread."""
        return self._current

    @property
    def keys(self) -> dict[str, Ed25519PublicKey]:
        """The trusted keys by key id."""
        return self._current[0]

    @property
    def threshold(self) -> int:
        """How many of them must sign an assignment."""
        return self._current[1]

    def unverified(self, data: bytes) -> None:
        """An assignment failed verification: refresh the keys, then verify ``data`` again (:meth:`run`)."""
        self._retry = data
        self.stale.set()

    def adopt(self, listing: AssignmentKeyList | None) -> bool:
        """Make a TUF-verified ``listing`` (None: none published) the trusted keys; True if they changed."""
        if listing == self.listing:
            return False
        self.listing = listing
        self._current = (listing.public_keys(), listing.threshold) if listing is not None else self._enrolled
        if self.cache is not None:
            if listing is None:
                with contextlib.suppress(FileNotFoundError):
                    self.cache.unlink()
            else:
                _atomic_write(self.cache, listing.encode())
        log.info(
            "keyring.updated",
            keys=sorted(self.keys),
            threshold=self.threshold,
            source="tuf" if listing else "enrollment",
        )
        return True

    async def refresh(self, lookup: Callable[[], Awaitable[AssignmentKeyList | None]]) -> bool | None:
        """Look the list up through TUF and adopt it: True if the keys changed, False if not, None if the lookup
        or the cache write failed (the keys in force are kept: a refresh must never stop the link)."""
        try:
            listing = await lookup()
            return await asyncio.to_thread(self.adopt, listing)
        except ReleaseError as exc:
            log.info("keyring.refresh_failed", error=str(exc))
        except Exception as exc:  # e.g. a full disk writing the cache: keep the keys, keep running
            log.warning("keyring.refresh_failed", error=str(exc) or type(exc).__name__)
        return None

    async def run(
        self,
        lookup: Callable[[], Awaitable[AssignmentKeyList | None]],
        retry: Callable[[bytes], Awaitable[object]],
        *,
        connected: asyncio.Event,
        interval: float = 3600.0,
    ) -> NoReturn:
        """Refresh when :attr:`stale` is set (the link sets it on every connect, :meth:`unverified` on a refused
        assignment) and every ``interval`` seconds while connected; re-verify a refused assignment after a
        change."""
        while True:
            raise_if_cancelled()  # the TUF lookup subscribes through aiomqtt (protocols/backoff.py)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.stale.wait()
            await connected.wait()
            self.stale.clear()
            answered = self._retry  # the refused assignment this refresh answers (not one refused meanwhile)
            changed = await self.refresh(lookup)
            if not self.stale.is_set():  # a connect since this refresh started asks for another one
                self.settled.set()
            if changed is None:
                if self._retry is not None:  # keep the refused assignment and try the refresh again soon
                    await asyncio.sleep(RETRY_AFTER_FAILED_REFRESH_S)
                    self.stale.set()
                continue
            if changed:  # verify the latest refused assignment again, with the new keys
                data, self._retry = self._retry, None
                if data is not None:
                    await retry(data)
            elif self._retry is answered:
                self._retry = None  # refused with the keys still in force: for good
            # else: refused while this refresh ran (its lookup may predate the new keys): the next refresh, which
            # its stale flag asks for, answers it


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
