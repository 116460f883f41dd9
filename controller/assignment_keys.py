"""Rotating the assignment key under TUF: ``edge-fleet keys rotate assignments``.

DESIGN.md §4: the keys that sign assignments (and acks) are published as the TUF target
``keys/assignments.json``, signed by the targets role, so devices take a new list only from verified metadata
(rollback and freeze protection) instead of from a re-enrolment. :func:`rotate_assignment_key`:

1. makes a new Ed25519 key and writes it, as pending, next to the current one — before anything is published, so
   that no device can ever trust a key that exists nowhere; a rotation interrupted after this step is finished
   by running the command again, which reuses the pending key;
2. publishes ``{new key}`` as the target (new targets, snapshot, timestamp);
3. retires the old private key to ``keys/retired/`` and installs the new one as the controller's assignment key
   (a running ``serve`` notices the file changed and signs with the new key from then on);
4. re-signs every device's newest assignment with the new key under a new generation (``serve`` publishes it),
   each read inside the transaction that re-signs it, so an assignment inserted meanwhile (a rollout's next
   wave or rollback) is the one re-signed, never undone; one already signed with the new key is left as it is:
   devices that moved to the new list refuse anything signed by the old key, the retained old assignment
   included.

Devices that have not yet refreshed their list refuse acks signed with the new key until they do (a re-signed
assignment that fails to verify makes them refresh at once); their outbox re-sends, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

from controller.errors import HomeError
from controller.home import FleetHome, atomic_write
from controller.releases import ReleaseRepository
from protocols.errors import DecodeError, ProtocolError
from protocols.keys import generate_private_key, keyid, private_key_from_pem, private_key_to_pem, public_key_to_pem
from protocols.link import open_sealed, seal
from protocols.messages import Assignment, DesiredModel
from protocols.releases import AssignmentKeyList
from protocols.topics import TopicKind, device_topic

__all__ = ["Rotation", "rotate_assignment_key"]


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a rotation did."""

    keyid: str
    targets_version: int
    resigned: int


def rotate_assignment_key(home: FleetHome, repo: ReleaseRepository) -> Rotation:
    """Rotate the assignment key (see the module docstring).

    Raises:
        ReleaseError: the targets, snapshot or timestamp keys are not on this machine.
        HomeError: the current assignment key cannot be read.
    """
    old = home.assignment_key()
    pending = home.assignment_key_path.with_name(home.assignment_key_path.name + ".pending")
    try:
        key = private_key_from_pem(pending.read_bytes())  # an interrupted rotation: finish it with the same key
    except FileNotFoundError:
        key = generate_private_key()
        atomic_write(pending, private_key_to_pem(key), 0o600)
    except DecodeError as exc:
        raise HomeError(f"{pending}: unreadable pending assignment key ({exc}); remove it to start over") from exc
    version = repo.publish_assignment_keys(AssignmentKeyList.of([key.public_key()]))
    retired = home.assignment_key_path.parent / "retired"
    retired.mkdir(parents=True, exist_ok=True, mode=0o700)
    if keyid(old) != keyid(key):
        atomic_write(retired / f"assignment-{keyid(old)}.key", private_key_to_pem(old), 0o600)
    atomic_write(home.assignment_key_path, private_key_to_pem(key), 0o600)
    atomic_write(home.assignment_key_path.with_suffix(".pub"), public_key_to_pem(key))
    pending.unlink(missing_ok=True)
    store = home.open_store()
    resigned = 0
    try:
        for device in [row.device for row in store.latest_assignments()]:
            with store.transaction():
                # The newest assignment as of this transaction, not of a snapshot taken before it: serve may have
                # inserted one since (a rollback, a wave), and re-signing an older one would undo it.
                newest = store.latest_assignments(devices=[device])
                if not newest:
                    continue  # revoked meanwhile
                row = newest[0]
                topic = device_topic(row.device, TopicKind.ASSIGN)
                with contextlib.suppress(ProtocolError):
                    open_sealed(topic, row.envelope, {keyid(key): key.public_key()})
                    continue  # already signed with the new key (by serve, which reloaded it)
                try:  # the stored envelope, as devices verify it: the same desired state (rollout id included)
                    previous = open_sealed(topic, row.envelope, {keyid(old): old.public_key()}).message
                except ProtocolError:
                    previous = Assignment(
                        row.device, row.generation, 0, tuple(DesiredModel.from_dict(m) for m in row.models)
                    )
                assert isinstance(previous, Assignment)
                generation = store.next_generation(row.device)
                assignment = dataclasses.replace(previous, generation=generation, issued_ts_ms=int(time.time() * 1000))
                store.add_assignment(row.device, generation, seal(assignment, TopicKind.ASSIGN, [key]), row.models)
            resigned += 1
    finally:
        store.close()
    return Rotation(keyid(key), version, resigned)
