"""The audit log's hash chain: record encoding and hashing, chain verification, signed checkpoints.

Shared by the device, which appends records (:func:`start_epoch`, :func:`make_record`) and signs checkpoints
(:func:`sign_checkpoint`), and the controller, which verifies uploads (:class:`ChainVerifier`). Pure: no
storage, no clock, no logging; functions return verified values or raise.

Invariants of a valid chain (DESIGN.md §6):

* A record is ``(epoch, seq, ts_ms, kind, actor, data, prev_hash, hash)``. ``hash`` is the lower-case hex
  sha256 of :func:`canonical_record`, the canonical JSON (no floats) of every other field.
* Within an epoch, ``seq`` goes up by exactly one and each ``prev_hash`` is the previous record's ``hash``.
* Every epoch begins at ``seq`` 0 with an ``epoch_start`` record whose ``prev_hash`` is :data:`ZERO_HASH` and
  whose data names the device and the last head of the previous epoch it knows (or null after a reset that
  lost it): ``{"device": ..., "previous": {"epoch", "seq", "hash"} | null, "reason": ...}``. The device id is
  thus bound into the chain by the first hash, and ``previous`` links epochs. ``seq`` 0 is always an
  ``epoch_start``, and an ``epoch_start`` is always ``seq`` 0. Epochs only go up.
* When the retention policy forces the device to drop records nobody has acknowledged, it appends a ``gap``
  record with data ``{"first_seq", "last_seq", "count", "last_hash"}``: seqs ``first..last`` were dropped
  (``count = last - first + 1``; ranges of consecutive drops are merged), and ``last_hash`` is the hash of
  record ``last_seq``, which the first kept record names as its ``prev_hash``. A hole in an upload is
  accepted only when a GAP record *in the same upload* accounts for it, so the device writes its GAP
  record directly after the hole (the GAP record is the first kept record): an upload that starts after
  the hole starts with the record that explains it, whatever its size.
* A checkpoint ``{device, epoch, seq, head_hash, ts_ms}`` is signed by the device's Ed25519 key over
  :data:`CHECKPOINT_DOMAIN` + its canonical JSON. The signed bytes travel as they were signed and are
  verified before they are parsed (never re-serialised to verify).

A controller decodes canonical uploads with :func:`scan_canonical_records` (through
:meth:`protocols.messages.AuditBatch.decode_canonical`), which reads each record from the received text,
checks it as :meth:`AuditRecord.read` does and hashes its received bytes, which are the bytes
:func:`canonical_record` would give; the digest is kept on the record, so :func:`record_hash` does not encode it
again.

How a list of records relates to the last accepted head (:func:`verify_chain`, :class:`ChainVerifier`):
records at or before the head are *duplicates* when the record at the head's seq has the head's hash
(the hash chain then makes every earlier one identical too); a different hash there is a **fork**
(``ChainError``); a list that ends before the head, or an older epoch, is a **regression**
(``RollbackError``), unless a ``known`` lookup of stored hashes shows it is a re-sent duplicate.

Errors: ``ChainError`` (a broken, forked or unexplained-hole chain), ``RollbackError`` (older than accepted),
``VerificationError``/``UnknownKeyError`` (checkpoint signature or a checkpoint that does not match the
records), ``DecodeError`` (malformed fields). Building an invalid record or checkpoint is a programming
error and raises ``ValueError``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any, Self

from protocols.canonical import (
    MAX_DEPTH,
    MAX_INT,
    MIN_INT,
    SHA256_RE,
    JSONStruct,
    ObjectReader,
    canonical_json,
    canonical_text,
    loads_object,
    scan_plain,
)
from protocols.errors import ChainError, DecodeError, RollbackError, UnknownKeyError, VerificationError
from protocols.keys import SIGNATURE_BYTES, Ed25519PrivateKey, Ed25519PublicKey, keyid, verify_signature
from protocols.limits import DEFAULT_LIMITS, DEVICE_ID_RE, Limits

__all__ = [
    "ACTOR_RE",
    "CHECKPOINT_DOMAIN",
    "KIND_EPOCH_START",
    "KIND_GAP",
    "KIND_RE",
    "ZERO_HASH",
    "AuditHead",
    "AuditRecord",
    "ChainVerifier",
    "CheckedUpload",
    "Checkpoint",
    "DroppedRange",
    "EpochChange",
    "EpochStart",
    "Gap",
    "KnownHash",
    "SignedCheckpoint",
    "VerifiedBatch",
    "canonical_record",
    "explains_hole",
    "gap_data",
    "make_record",
    "record_hash",
    "scan_canonical_records",
    "sign_checkpoint",
    "start_epoch",
    "verify_chain",
    "verify_checkpoint",
]

ZERO_HASH = "0" * 64
"""``prev_hash`` of every epoch's first record."""

KIND_EPOCH_START = "epoch_start"
"""Kind of the first record (seq 0) of every epoch."""

KIND_GAP = "gap"
"""Kind of the record that declares dropped records."""

KIND_RE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
"""Record kinds, e.g. ``model.activated``, ``api.auth_failed``, ``gap``."""

ACTOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
"""Actors, e.g. ``agent``, ``controller``, ``uid:1000``, ``token:3f2a9c``."""

CHECKPOINT_DOMAIN = b"edgefleet-audit-checkpoint-v1\n"
"""Prefix of the signed checkpoint bytes, so a checkpoint signature can never be mistaken for another one."""

MAX_REASON = 256
"""Longest ``reason`` of an ``epoch_start`` record."""

MAX_CHECKPOINT_BODY = 1024
"""Largest encoded checkpoint body; a real one is about 250 bytes."""

KnownHash = Callable[[int, int], str | None]
"""Lookup ``(epoch, seq) -> hash`` of records already stored, or None when unknown (used for re-sent data)."""


# --- records --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditHead(JSONStruct):
    """The last record of a chain: its epoch, seq and hash. Also the ``previous`` of an ``epoch_start``."""

    epoch: int
    seq: int
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """``{"epoch", "seq", "hash"}``."""
        return {"epoch": self.epoch, "seq": self.seq, "hash": self.hash}

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse: non-negative epoch and seq below 2**63, sha256 hash."""
        return cls(epoch=reader.integer("epoch"), seq=reader.integer("seq"), hash=reader.sha256("hash"))


@dataclass(frozen=True, slots=True)
class AuditRecord(JSONStruct):
    """One audit record.

    Attributes:
        epoch: Log epoch; bumped when the device's log restarts (see module docstring).
        seq: Position in the epoch, from 0.
        ts_ms: Device wall-clock time, integer milliseconds since the Unix epoch (not trusted for order).
        kind: What happened (:data:`KIND_RE`).
        actor: Who did it (:data:`ACTOR_RE`).
        data: Details, a JSON object without floats, at most ``limits.max_audit_data_bytes`` encoded.
            Treat it as read-only: it is hashed.
        prev_hash: ``hash`` of the previous record, :data:`ZERO_HASH` for seq 0.
        hash: sha256 of :func:`canonical_record`.
    """

    epoch: int
    seq: int
    ts_ms: int
    kind: str
    actor: str
    data: dict[str, Any]
    prev_hash: str
    hash: str
    # The canonical JSON text of ``data`` as :meth:`read` (or :func:`scan_canonical_records`) read it, for
    # the size check, kept so that hashing and storing a received record do not encode ``data`` twice more
    # (the controller's ingest rate depends on it). Not an init argument: ``dataclasses.replace`` and direct
    # construction leave it unset, so a record built with other data can never carry a stale encoding.
    _data_text: str | None = field(default=None, init=False, repr=False, compare=False)
    # The sha256 of :func:`canonical_record`, set only by :func:`scan_canonical_records`, which hashed exactly
    # that encoding, checked to be the received bytes (same rule as ``_data_text``: never carried over).
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def head(self) -> AuditHead:
        """This record as a chain head."""
        return AuditHead(epoch=self.epoch, seq=self.seq, hash=self.hash)

    def canonical_data(self) -> bytes:
        """Canonical JSON of ``data`` (cached when the record was parsed by :meth:`read`).

        Raises:
            ValueError, TypeError: ``data`` cannot be encoded.
        """
        return self.canonical_data_text().encode("utf-8")

    def canonical_data_text(self) -> str:
        """:meth:`canonical_data` as text (what the controller stores).

        Raises:
            ValueError, TypeError: ``data`` cannot be encoded.
        """
        text = self._data_text
        return text if text is not None else canonical_json(self.data).decode("utf-8")

    def hashed_fields(self) -> dict[str, Any]:
        """Every field except ``hash``: what :func:`record_hash` covers."""
        return {
            "epoch": self.epoch,
            "seq": self.seq,
            "ts_ms": self.ts_ms,
            "kind": self.kind,
            "actor": self.actor,
            "data": self.data,
            "prev_hash": self.prev_hash,
        }

    def to_dict(self) -> dict[str, Any]:
        """Every field, ``hash`` included."""
        return {**self.hashed_fields(), "hash": self.hash}

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse the fields' syntax; chain rules and the hash are checked by :func:`verify_chain`."""
        fast = _read_plain(reader)
        if fast is not None:
            record = cls(*fast[:8])
            object.__setattr__(record, "_data_text", fast[8].decode("utf-8"))
            return record
        data = reader.mapping("data")
        try:
            encoded = canonical_json(data)
        except (ValueError, TypeError) as exc:
            raise DecodeError(f"{reader.path('data')}: {exc}") from exc
        if len(encoded) > reader.limits.max_audit_data_bytes:
            raise DecodeError(
                f"{reader.path('data')}: {len(encoded)} bytes, more than {reader.limits.max_audit_data_bytes}"
            )
        record = cls(
            epoch=reader.integer("epoch"),
            seq=reader.integer("seq"),
            ts_ms=reader.integer("ts_ms"),
            kind=reader.string("kind", pattern=KIND_RE, max_len=64),
            actor=reader.string("actor", pattern=ACTOR_RE, max_len=128),
            data=data,
            prev_hash=reader.sha256("prev_hash"),
            hash=reader.sha256("hash"),
        )
        object.__setattr__(record, "_data_text", encoded.decode("utf-8"))
        return record


def _read_plain(reader: ObjectReader) -> tuple[Any, ...] | None:
    """The fields of a record that passes every check of :meth:`AuditRecord.read` in one pass, else None.

    A controller ingests thousands of records per second and the field-by-field reader costs several times
    the JSON parse; this accepts exactly what the reader accepts (same types, bounds and patterns) and hands
    anything else, valid or not, to the reader, which then names the offending field.
    """
    obj = reader.raw
    epoch, seq, ts_ms = obj.get("epoch"), obj.get("seq"), obj.get("ts_ms")
    kind, actor, data = obj.get("kind"), obj.get("actor"), obj.get("data")
    prev_hash, hash_ = obj.get("prev_hash"), obj.get("hash")
    limits = reader.limits
    if not (
        type(epoch) is int
        and type(seq) is int
        and type(ts_ms) is int
        and 0 <= epoch <= MAX_INT
        and 0 <= seq <= MAX_INT
        and 0 <= ts_ms <= MAX_INT
        and type(kind) is str
        and len(kind) <= 64
        and KIND_RE.fullmatch(kind) is not None
        and type(actor) is str
        and len(actor) <= 128
        and ACTOR_RE.fullmatch(actor) is not None
        and type(prev_hash) is str
        and SHA256_RE.fullmatch(prev_hash) is not None
        and type(hash_) is str
        and SHA256_RE.fullmatch(hash_) is not None
        and type(data) is dict
        and len(data) <= limits.max_list
    ):
        return None
    try:
        encoded = canonical_json(data)
    except (ValueError, TypeError):
        return None
    if len(encoded) > limits.max_audit_data_bytes:
        return None
    return epoch, seq, ts_ms, kind, actor, data, prev_hash, hash_, encoded


_CANONICAL_RECORD = re.compile(
    r'(\{"actor":"(' + ACTOR_RE.pattern + r')","data":(\{[^{}]*\}|\{.*?\}),"epoch":(0|[1-9][0-9]{0,18}),)'
    r'"hash":"(.{64})",'
    r'("kind":"(' + KIND_RE.pattern + r')","prev_hash":"(.{64})",'
    r'"seq":(0|[1-9][0-9]{0,18}),"ts_ms":(0|[1-9][0-9]{0,18})\})'
    r"([,\]])",
    re.DOTALL,
)
"""One record as :func:`~protocols.canonical.canonical_json` writes it (keys sorted; kind and actor need no
escapes, numbers have no leading zeros), then the ``,`` or ``]`` after it in the array. Groups 1 and 6 are the
record's text before and after its ``hash`` member: together, the bytes the hash covers. ``data`` is taken up to
the first ``}`` that the rest of the record follows (flat data, the usual, without trying character by
character): when that cuts a nested ``data`` short, the piece is not valid JSON and
:func:`scan_canonical_records` gives up. The two hashes are any 64 characters here, cheaper to match than a
class; the scan checks them (``hash`` equals the digest it computes, ``prev_hash`` links or is lower-case hex).
No nested quantifier: a match attempt is linear in the text it covers, and a failed one ends the scan."""


def scan_canonical_records(
    text: str, start: int, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[list[AuditRecord], int] | None:
    """The records of a canonical upload's ``records`` array, read from its text; None if any doubt.

    The controller's fast path (:meth:`protocols.messages.AuditBatch.decode_canonical`). ``text`` is the
    upload and ``start`` the index just after the array's ``[``. Each record must match
    :data:`_CANONICAL_RECORD`, the canonical encoding of exactly the eight fields with the patterns and bounds of
    :meth:`AuditRecord.read`, every one of the same epoch, each followed by ``,`` or by the ``]`` that ends the
    array, at most ``limits.max_audit_batch`` of them. Each ``data`` text must be exactly one JSON value (the
    C parser, from where it starts), and together they must re-encode to exactly themselves: objects of at most
    ``limits.max_list`` keys and
    ``limits.max_audit_data_bytes``, no integer outside the signed 64-bit range, nesting within the upload's
    bound. JSON's grammar has one parse per text, so pieces that are each valid and canonical and that make up
    the array's text exactly are the records any parser reads there: each record's hash is computed over its
    received bytes with the ``hash`` member cut out (:func:`canonical_record`), and kept.

    A record whose ``hash`` is not the sha256 of its contents gives None, so that :meth:`AuditRecord.read` and
    then :class:`ChainVerifier` report it exactly as for any other input.

    Returns:
        The records and the index just after the array's ``]``, or None: the caller then decodes with the
        strict parser (:func:`protocols.messages.decode`), which accepts or names the invalid field.
    """
    if text.startswith("]", start):
        return [], start + 1
    records: list[AuditRecord] = []
    texts: list[str] = []
    datas: list[Any] = []
    match, sha256, max_int, max_records = _CANONICAL_RECORD.match, hashlib.sha256, MAX_INT, limits.max_audit_batch
    epoch_text = previous_hash = None
    position = start
    while True:
        found = match(text, position)
        if found is None or len(records) == max_records:
            return None
        before, actor, data_text, record_epoch, hash_, behind, kind, prev_hash, seq_text, ts_text, after = (
            found.groups()
        )
        if record_epoch != epoch_text:  # canonical digits: equal texts, equal numbers
            if epoch_text is not None or int(record_epoch) > max_int:
                return None
            epoch_text = record_epoch
        seq, ts_ms = int(seq_text), int(ts_text)
        if seq > max_int or ts_ms > max_int:
            return None
        if prev_hash != previous_hash and SHA256_RE.fullmatch(prev_hash) is None:
            return None
        try:  # the bytes the hash covers: the record without ``"hash":"<64>",``, which sorts between epoch and kind
            hashed = (before + behind).encode()
        except UnicodeEncodeError:  # a lone surrogate: the strict decoder refuses it and says so
            return None
        digest = sha256(hashed).hexdigest()
        if digest != hash_:  # also makes ``hash`` lower-case hex
            return None
        previous_hash = hash_
        # ``data`` must be one JSON value that ends where the pattern's piece ends (its canonical form is checked
        # below, for all records at once): else the piece is not this record's data, or not JSON.
        data_start = found.start(3)
        try:
            data, data_end = scan_plain(text, data_start)
        except (StopIteration, ValueError, RecursionError):
            return None
        if data_end - data_start != len(data_text):
            return None
        # AuditRecord(...) plus the two cached fields, set through the slots directly: a frozen dataclass's
        # __init__ goes through object.__setattr__ once per field, which cost more than hashing the record.
        # ``epoch`` is set below, once every record is known to be of the same one.
        record = _new_record(AuditRecord)
        _set_seq(record, seq)
        _set_ts_ms(record, ts_ms)
        _set_kind(record, kind)
        _set_actor(record, actor)
        _set_prev_hash(record, prev_hash)
        _set_hash(record, hash_)
        _set_data(record, data)
        _set_data_text(record, data_text)
        _set_digest(record, digest)
        records.append(record)
        datas.append(data)
        texts.append(data_text)
        position = found.end()
        if after == "]":
            break
    # Each text is exactly one JSON value, so the joined texts are canonical only if each one is: where a text
    # and its value's canonical form first differ, one of them would end a value the other continues.
    joined = "[" + ",".join(texts) + "]"
    try:
        if canonical_text(datas) != joined:
            return None
    except (ValueError, TypeError, RecursionError):  # the encoder's recursion can run out where the parser's did not
        return None
    if not _data_within_bounds(datas, texts, joined, limits):
        return None
    epoch = int(record_epoch)  # the last record's: all are the same
    for record in records:
        _set_epoch(record, epoch)
    return records, position


def _data_within_bounds(datas: list[Any], texts: list[str], joined: str, limits: Limits) -> bool:
    """Every ``data`` of :func:`scan_canonical_records` is an object :meth:`AuditRecord.read` accepts.

    Each text is the canonical form of the value beside it in ``datas``; ``joined`` is ``[`` + the texts joined by
    commas + ``]``.
    Checked for all at once where it can be, record by record only where the joint check is in doubt.
    """
    if not all(type(data) is dict for data in datas) or max(map(len, datas)) > limits.max_list:
        return False
    max_data = limits.max_audit_data_bytes
    # a character takes at most 4 bytes: below a quarter of the bound, every text fits without encoding it
    if max(map(len, texts)) > max_data // 4 and any(len(text.encode("utf-8")) > max_data for text in texts):
        return False
    # canonical_json(data) refuses integers outside the signed 64-bit range (19 digits or more) and nesting past
    # its bound (data sits at depth 4 of the upload). Both are counted in strings too, so only ever too cautious:
    # a flat object's integers are then checked one by one, nested data goes to the strict reader.
    depth_budget = MAX_DEPTH - 3
    flat = joined.count("{") + joined.count("[") == len(texts) + 1  # one brace each: flat, no brace in a string
    if not flat and any(text.count("{") + text.count("[") > depth_budget for text in texts):
        return False
    if _DIGIT_RUN in joined.encode("utf-8").translate(_DIGITS_TO_ZERO):
        for data, text in zip(datas, texts, strict=True):
            if _LONG_DIGITS.search(text) is None:
                continue
            for value in data.values():
                kind_of = type(value)
                if kind_of is dict or kind_of is list or (kind_of is int and not MIN_INT <= value <= MAX_INT):
                    return False
    return True


_RECORD_FIELDS = ("epoch", "seq", "ts_ms", "kind", "actor", "data", "prev_hash", "hash", "_data_text", "_digest")
if tuple(f.name for f in dataclasses.fields(AuditRecord)) != _RECORD_FIELDS:  # pragma: no cover
    raise ImportError("AuditRecord's fields changed: update scan_canonical_records, which sets every one of them")
_new_record = object.__new__
(
    _set_epoch,
    _set_seq,
    _set_ts_ms,
    _set_kind,
    _set_actor,
    _set_data,
    _set_prev_hash,
    _set_hash,
    _set_data_text,
    _set_digest,
) = (getattr(AuditRecord, name).__set__ for name in _RECORD_FIELDS)


_LONG_DIGITS = re.compile(r"[0-9]{19}")
"""A run of digits that could be an integer outside the signed 64-bit range (19 digits or more)."""

_DIGITS_TO_ZERO = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_DIGIT_RUN = b"0" * 19
""":data:`_LONG_DIGITS` over a whole text at once: translated with ``_DIGITS_TO_ZERO`` (every digit a ``0``,
every other byte a space), it contains ``_DIGIT_RUN`` exactly where the pattern matches, found several times
faster than the pattern's search."""


def canonical_record(record: AuditRecord) -> bytes:
    """The canonical JSON bytes that a record's hash covers (every field but ``hash``).

    Raises:
        ValueError, TypeError: a field cannot be encoded (a float in ``data``, ...).
    """
    epoch, seq, ts_ms = record.epoch, record.seq, record.ts_ms
    if (
        type(epoch) is int
        and type(seq) is int
        and type(ts_ms) is int
        and 0 <= epoch <= MAX_INT
        and 0 <= seq <= MAX_INT
        and 0 <= ts_ms <= MAX_INT
        and type(record.kind) is str
        and type(record.actor) is str
        and type(record.prev_hash) is str
    ):
        # Fast path, byte-for-byte what canonical_json(hashed_fields()) gives (keys in sorted order; the
        # strings through the same encoder): ``data`` is encoded once, and only when not cached by read().
        try:
            actor, kind, prev = encode_basestring(record.actor), encode_basestring(record.kind), record.prev_hash
            data = record.canonical_data_text()
            return (
                f'{{"actor":{actor},"data":{data},"epoch":{epoch},"kind":{kind},'
                f'"prev_hash":{encode_basestring(prev)},"seq":{seq},"ts_ms":{ts_ms}}}'
            ).encode()
        except UnicodeEncodeError:
            pass  # a lone surrogate: the full encoder below raises the ValueError that names it
    return canonical_json(record.hashed_fields())


def record_hash(record: AuditRecord) -> str:
    """The hash a record must carry: lower-case hex sha256 of :func:`canonical_record`.

    Raises:
        ValueError, TypeError: a field cannot be encoded.
    """
    digest = record._digest
    if digest is not None:  # hashed from the received canonical bytes by scan_canonical_records
        return digest
    return hashlib.sha256(canonical_record(record)).hexdigest()


@dataclass(frozen=True, slots=True)
class EpochStart(JSONStruct):
    """The data of an ``epoch_start`` record.

    Attributes:
        device: The device whose log this is.
        previous: The last head of an earlier epoch the device still knows, or None if it lost it.
        reason: Why the epoch started (``first start``, ``database restored``, ...).
    """

    device: str
    previous: AuditHead | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """``{"device", "previous", "reason"}``; ``previous`` is null when unknown."""
        return {
            "device": self.device,
            "previous": None if self.previous is None else self.previous.to_dict(),
            "reason": self.reason,
        }

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse the three fields."""
        return cls(
            device=reader.string("device", pattern=DEVICE_ID_RE, max_len=64),
            previous=reader.struct("previous", AuditHead) if reader.present("previous") else None,
            reason=reader.string("reason", max_len=MAX_REASON),
        )


@dataclass(frozen=True, slots=True)
class Gap(JSONStruct):
    """The data of a ``gap`` record: seqs ``first_seq..last_seq`` of the same epoch were dropped.

    Attributes:
        first_seq: First dropped seq.
        last_seq: Last dropped seq (below the gap record's own seq).
        count: ``last_seq - first_seq + 1``.
        last_hash: Hash of the dropped record ``last_seq``: the ``prev_hash`` of record ``last_seq + 1``.
    """

    first_seq: int
    last_seq: int
    count: int
    last_hash: str

    def to_dict(self) -> dict[str, Any]:
        """``{"first_seq", "last_seq", "count", "last_hash"}``."""
        return {
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "count": self.count,
            "last_hash": self.last_hash,
        }

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse the four fields and check ``count``."""
        gap = cls(
            first_seq=reader.integer("first_seq"),
            last_seq=reader.integer("last_seq"),
            count=reader.integer("count", lo=1),
            last_hash=reader.sha256("last_hash"),
        )
        if gap.last_seq < gap.first_seq or gap.count != gap.last_seq - gap.first_seq + 1:
            raise DecodeError(f"{reader.path('count')}: must equal last_seq - first_seq + 1")
        return gap


def gap_data(first_seq: int, last_seq: int, last_hash: str) -> dict[str, Any]:
    """The ``data`` of a ``gap`` record declaring that ``first_seq..last_seq`` were dropped."""
    return Gap(first_seq, last_seq, last_seq - first_seq + 1, last_hash).to_dict()


def _epoch_start_of(record: AuditRecord) -> EpochStart:
    try:
        start = EpochStart.from_dict(record.data)
    except DecodeError as exc:
        raise ChainError(f"epoch {record.epoch} seq {record.seq}: malformed epoch_start data: {exc}") from exc
    if start.previous is not None and start.previous.epoch >= record.epoch:
        raise ChainError(f"epoch {record.epoch} seq 0: names previous epoch {start.previous.epoch}, not older")
    return start


def _gap_of(record: AuditRecord) -> Gap:
    try:
        gap = Gap.from_dict(record.data)
    except DecodeError as exc:
        raise ChainError(f"epoch {record.epoch} seq {record.seq}: malformed gap data: {exc}") from exc
    if gap.last_seq >= record.seq:
        raise ChainError(f"epoch {record.epoch} seq {record.seq}: gap ends at {gap.last_seq}, not before itself")
    return gap


def explains_hole(record: AuditRecord, start: AuditRecord, expected_seq: int) -> bool:
    """True if ``record`` is a GAP record that accounts for the hole from ``expected_seq`` to just before ``start``
    (the record after it): the rule a controller applies to an upload, and the device to the batches it builds.

    Raises:
        ChainError: ``record`` is a GAP record with malformed data.
    """
    if record.kind != KIND_GAP or record.epoch != start.epoch:
        return False
    gap = _gap_of(record)
    return gap.first_seq <= expected_seq and gap.last_seq == start.seq - 1 and gap.last_hash == start.prev_hash


_RULED_KINDS = (KIND_EPOCH_START, KIND_GAP)
"""Kinds :func:`_check_record` has rules for (a tuple: ``in`` compares, never hashes, a record's ``kind``)."""


def _check_record(record: AuditRecord) -> None:
    """Rules one record must satisfy on its own; raises ChainError naming the seq."""
    try:
        expected = record_hash(record)
    except (ValueError, TypeError) as exc:
        raise ChainError(f"epoch {record.epoch} seq {record.seq}: record cannot be encoded: {exc}") from exc
    if expected != record.hash:
        raise ChainError(f"epoch {record.epoch} seq {record.seq}: hash does not match the record's contents")
    if record.seq == 0 or record.kind == KIND_EPOCH_START:
        where = f"epoch {record.epoch} seq {record.seq}"
        if record.seq != 0 or record.kind != KIND_EPOCH_START:
            raise ChainError(f"{where}: seq 0 and only seq 0 is an epoch_start record")
        if record.prev_hash != ZERO_HASH:
            raise ChainError(f"{where}: an epoch_start record has the all-zero prev_hash")
        _epoch_start_of(record)
    if record.kind == KIND_GAP:
        _gap_of(record)


def _build(fields: dict[str, Any], limits: Limits) -> AuditRecord:
    """A record from its hashed fields, validated exactly as a receiver would; ValueError if invalid."""
    try:
        draft = AuditRecord.from_dict({**fields, "hash": ZERO_HASH}, limits=limits)
        record = AuditRecord(**{**draft.hashed_fields(), "hash": record_hash(draft)})
        _check_record(record)
    except (DecodeError, ChainError) as exc:
        raise ValueError(f"invalid audit record: {exc}") from exc
    return record


def start_epoch(
    device: str,
    epoch: int,
    *,
    previous: AuditHead | None,
    reason: str,
    actor: str,
    ts_ms: int,
    limits: Limits = DEFAULT_LIMITS,
) -> AuditRecord:
    """The first record (seq 0) of ``epoch``.

    Args:
        device: The device id, bound into the chain by this record's hash.
        epoch: The new epoch; greater than ``previous.epoch``.
        previous: The last head of an earlier epoch the device knows, or None if it has none (first start,
            or a reset that lost the log; the controller flags an unlinked epoch).
        reason: Why the epoch starts, for operators.
        actor: Who started it (usually ``agent``).
        ts_ms: Wall-clock time in integer milliseconds since the Unix epoch.
        limits: Bounds to validate against.

    Raises:
        ValueError: an argument is invalid.
    """
    data = EpochStart(device=device, previous=previous, reason=reason).to_dict()
    fields = {
        "epoch": epoch,
        "seq": 0,
        "ts_ms": ts_ms,
        "kind": KIND_EPOCH_START,
        "actor": actor,
        "data": data,
        "prev_hash": ZERO_HASH,
    }
    return _build(fields, limits)


def make_record(
    prev: AuditRecord | AuditHead,
    kind: str,
    actor: str,
    data: Mapping[str, Any],
    ts_ms: int,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> AuditRecord:
    """The record that follows ``prev`` in the same epoch (``seq + 1``, ``prev_hash = prev.hash``).

    An epoch's first record comes from :func:`start_epoch`, not from here.

    Args:
        prev: The current head (the last record, or its ``(epoch, seq, hash)``).
        kind: Record kind (:data:`KIND_RE`); not ``epoch_start``. A ``gap`` needs :func:`gap_data`.
        actor: Who did it (:data:`ACTOR_RE`).
        data: Details, a JSON object without floats (copied).
        ts_ms: Wall-clock time in integer milliseconds since the Unix epoch.
        limits: Bounds to validate against.

    Raises:
        ValueError: an argument is invalid (floats or oversized ``data``, bad kind, malformed gap data).
    """
    fields = {
        "epoch": prev.epoch,
        "seq": prev.seq + 1,
        "ts_ms": ts_ms,
        "kind": kind,
        "actor": actor,
        "data": dict(data),
        "prev_hash": prev.hash,
    }
    return _build(fields, limits)


# --- checkpoints ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint(JSONStruct):
    """A device's statement "my log's head in ``epoch`` is ``seq`` with hash ``head_hash``".

    Attributes:
        device: The device id.
        epoch: Log epoch.
        seq: Seq of the head record.
        head_hash: Hash of the head record.
        ts_ms: When it was made, integer milliseconds since the Unix epoch.
    """

    device: str
    epoch: int
    seq: int
    head_hash: str
    ts_ms: int

    @property
    def head(self) -> AuditHead:
        """The head this checkpoint names."""
        return AuditHead(epoch=self.epoch, seq=self.seq, hash=self.head_hash)

    def to_dict(self) -> dict[str, Any]:
        """``{"device", "epoch", "seq", "head_hash", "ts_ms"}``."""
        return {
            "device": self.device,
            "epoch": self.epoch,
            "seq": self.seq,
            "head_hash": self.head_hash,
            "ts_ms": self.ts_ms,
        }

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse the five fields."""
        return cls(
            device=reader.string("device", pattern=DEVICE_ID_RE, max_len=64),
            epoch=reader.integer("epoch"),
            seq=reader.integer("seq"),
            head_hash=reader.sha256("head_hash"),
            ts_ms=reader.integer("ts_ms"),
        )


@dataclass(frozen=True, slots=True)
class SignedCheckpoint(JSONStruct):
    """A checkpoint as signed: the exact body bytes, the signature, and the signing key's id.

    On the wire: ``{"keyid": hex, "sig": base64, "body": base64}`` with canonical (padded, zero unused bits)
    base64, so that one signed checkpoint has exactly one encoding.

    Attributes:
        keyid: :func:`protocols.keys.keyid` of the device key.
        signature: 64-byte Ed25519 signature over :data:`CHECKPOINT_DOMAIN` + ``body``.
        body: Canonical JSON of the :class:`Checkpoint`.
    """

    keyid: str
    signature: bytes
    body: bytes

    def to_dict(self) -> dict[str, Any]:
        """``{"keyid", "sig", "body"}``, bytes as base64."""
        return {
            "keyid": self.keyid,
            "sig": base64.b64encode(self.signature).decode("ascii"),
            "body": base64.b64encode(self.body).decode("ascii"),
        }

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse the syntax only; :func:`verify_checkpoint` checks the signature and then the body."""
        signature = _b64(reader, "sig", 4 * ((SIGNATURE_BYTES + 2) // 3))
        if len(signature) != SIGNATURE_BYTES:
            raise DecodeError(f"{reader.path('sig')}: an Ed25519 signature is {SIGNATURE_BYTES} bytes")
        return cls(
            keyid=reader.sha256("keyid"),
            signature=signature,
            body=_b64(reader, "body", 4 * ((MAX_CHECKPOINT_BODY + 2) // 3)),
        )

    def encode(self) -> bytes:
        """Canonical JSON bytes (for storage or a standalone upload)."""
        return canonical_json(self.to_dict())

    @classmethod
    def decode(cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Self:
        """Parse :meth:`encode` output.

        Raises:
            DecodeError: malformed.
        """
        return cls.from_dict(loads_object(data, max_bytes=4 * MAX_CHECKPOINT_BODY), limits=limits)


def _b64(reader: ObjectReader, key: str, max_len: int) -> bytes:
    text = reader.string(key, max_len=max_len)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"{reader.path(key)}: not base64") from exc
    # Non-zero unused bits ("QR==" decodes like "QQ==") would give one value several encodings.
    if base64.b64encode(raw).decode("ascii") != text:
        raise DecodeError(f"{reader.path(key)}: not canonical base64")
    return raw


def sign_checkpoint(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> SignedCheckpoint:
    """Sign ``checkpoint`` with the device key.

    Raises:
        ValueError: the checkpoint's fields are invalid.
    """
    try:
        Checkpoint.from_dict(checkpoint.to_dict())
    except DecodeError as exc:
        raise ValueError(f"invalid checkpoint: {exc}") from exc
    body = canonical_json(checkpoint.to_dict())
    return SignedCheckpoint(keyid=keyid(key), signature=key.sign(CHECKPOINT_DOMAIN + body), body=body)


def verify_checkpoint(
    signed: SignedCheckpoint, public_key: Ed25519PublicKey, *, limits: Limits = DEFAULT_LIMITS
) -> Checkpoint:
    """Verify the signature over the raw signed bytes, then parse them.

    Args:
        signed: The signed checkpoint as received.
        public_key: The device's public key.
        limits: Bounds for parsing.

    Returns:
        The checkpoint.

    Raises:
        UnknownKeyError: ``signed.keyid`` is not the id of ``public_key``.
        VerificationError: the signature does not verify.
        DecodeError: the signed body is not a canonical, well-formed checkpoint.
    """
    expected = keyid(public_key)
    if signed.keyid != expected:
        raise UnknownKeyError(f"checkpoint signed by key {signed.keyid[:16]}…, expected {expected[:16]}…")
    verify_signature(public_key, signed.signature, CHECKPOINT_DOMAIN + signed.body)
    checkpoint = Checkpoint.from_dict(loads_object(signed.body, max_bytes=MAX_CHECKPOINT_BODY), limits=limits)
    if canonical_json(checkpoint.to_dict()) != signed.body:
        raise DecodeError("checkpoint body is not canonical JSON")
    return checkpoint


# --- chain verification ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DroppedRange:
    """A range of records the device declared dropped with a GAP record.

    Attributes:
        epoch: The epoch.
        declared_at: Seq of the GAP record.
        first_seq: First dropped seq.
        last_seq: Last dropped seq.
        missing: How many of them the verifier never accepted (0 when it had them all already).
    """

    epoch: int
    declared_at: int
    first_seq: int
    last_seq: int
    missing: int


@dataclass(frozen=True, slots=True)
class EpochChange:
    """The records start a newer epoch than the accepted head's.

    Attributes:
        epoch: The new epoch.
        accepted: The head accepted before (in an older epoch).
        claimed: The previous head the device names in its ``epoch_start`` record, or None if it names none
            (or its ``epoch_start`` was dropped).
    """

    epoch: int
    accepted: AuditHead
    claimed: AuditHead | None

    @property
    def linked(self) -> bool:
        """True when the device's new epoch continues exactly from the accepted head (nothing lost)."""
        return self.claimed == self.accepted


@dataclass(frozen=True, slots=True)
class _Outcome:
    head: AuditHead
    new: tuple[AuditRecord, ...]
    duplicates: int
    dropped: tuple[DroppedRange, ...]
    epoch_change: EpochChange | None


def _check_links(records: Sequence[AuditRecord]) -> None:
    epoch = records[0].epoch
    previous: AuditRecord | None = None
    for record in records:
        if record.epoch != epoch:
            raise ChainError(f"seq {record.seq}: epoch {record.epoch} in a list of epoch {epoch} records")
        # _check_record would find nothing wrong (and is skipped, a call per record less) when the record's hash
        # is its digest kept from scan_canonical_records and no rule for seq 0, epoch_start or gap applies.
        digest = record._digest
        if digest is None or digest != record.hash or record.seq == 0 or record.kind in _RULED_KINDS:
            _check_record(record)
        if previous is not None:
            if record.seq != previous.seq + 1:
                raise ChainError(
                    f"epoch {epoch} seq {record.seq} follows seq {previous.seq}: "
                    "records are missing, reordered or inserted"
                )
            if record.prev_hash != previous.hash:
                raise ChainError(f"epoch {epoch} seq {record.seq}: prev_hash does not link to seq {previous.seq}")
        previous = record


def _require_stored(known: KnownHash | None, epoch: int, seq: int, hash_: str, *, behind: str, what: str) -> None:
    """Something behind the accepted head is a re-sent duplicate only if the record at ``(epoch, seq)`` is stored
    with ``hash_``.

    Raises:
        RollbackError: nothing is stored there (``behind`` says what lies behind the head).
        ChainError: a fork: the stored record differs (``what`` names the differing thing).
    """
    stored = known(epoch, seq) if known is not None else None
    if stored is None:
        raise RollbackError(behind)
    if stored != hash_:
        raise ChainError(f"fork: {what} differs from the stored record")


def _relate(
    records: Sequence[AuditRecord], after: AuditHead | None, known: KnownHash | None, *, links_checked: bool = False
) -> _Outcome:
    """Check ``records`` (non-empty) and relate them to the accepted head ``after``.

    ``links_checked``: :func:`_check_links` already passed on exactly these records (:class:`CheckedUpload`).
    """
    if not links_checked:
        _check_links(records)
    epoch, first, last = records[0].epoch, records[0], records[-1]
    new: Sequence[AuditRecord] = records
    duplicates = 0
    epoch_change: EpochChange | None = None
    expected_seq, expected_prev = 0, ZERO_HASH
    if after is not None and (epoch, last.seq) < (after.epoch, after.seq):
        # Wholly behind the accepted head, in its epoch or an older one (an ack lost before the device moved on):
        # a re-sent batch, all duplicates if its last record is stored (the chain makes every earlier one equal).
        _require_stored(
            known,
            epoch,
            last.seq,
            last.hash,
            behind=f"records of epoch {epoch}, older than the accepted epoch {after.epoch}"
            if epoch < after.epoch
            else f"records end at epoch {epoch} seq {last.seq}, before the accepted head seq {after.seq}",
            what=f"epoch {epoch} seq {last.seq}",
        )
        return _Outcome(after, (), len(records), (), None)
    if after is not None and epoch == after.epoch:
        if first.seq <= after.seq:  # and last.seq >= after.seq: the records reach the head
            # The hash at the head's seq commits to every earlier record: equal means all are duplicates.
            if records[after.seq - first.seq].hash != after.hash:
                raise ChainError(f"fork: epoch {epoch} seq {after.seq} differs from the accepted record")
            duplicates = after.seq - first.seq + 1
            new = records[duplicates:]
        expected_seq, expected_prev = after.seq + 1, after.hash
    if new:
        start = new[0]
        if start.seq == expected_seq:
            if start.prev_hash != expected_prev:
                raise ChainError(f"fork: epoch {epoch} seq {start.seq} does not link to the accepted head")
        elif not any(explains_hole(r, start, expected_seq) for r in new):
            raise ChainError(
                f"epoch {epoch} seqs {expected_seq}..{start.seq - 1} are missing and no GAP record accounts for them"
            )
    if after is not None and epoch > after.epoch:
        claimed = _epoch_start_of(new[0]).previous if new[0].seq == 0 else None
        epoch_change = EpochChange(epoch=epoch, accepted=after, claimed=claimed)
    dropped = []
    for record in new:
        if record.kind == KIND_GAP:
            gap = _gap_of(record)
            low, high = max(gap.first_seq, expected_seq), min(gap.last_seq, new[0].seq - 1)
            dropped.append(DroppedRange(epoch, record.seq, gap.first_seq, gap.last_seq, max(0, high - low + 1)))
    if new:
        head = new[-1].head
    else:
        assert after is not None  # only duplicates of an accepted head leave nothing new
        head = after
    return _Outcome(head, tuple(new), duplicates, tuple(dropped), epoch_change)


def verify_chain(
    records: Sequence[AuditRecord], *, after: AuditHead | None = None, known: KnownHash | None = None
) -> AuditHead:
    """Verify that ``records`` form one unbroken chain that continues from ``after``.

    Checks every hash, ``seq + 1`` steps and ``prev_hash`` links within one epoch, the epoch_start/gap
    rules, and the relation to ``after`` described in the module docstring. ``after=None`` means nothing
    was accepted yet: the records must start at seq 0 (or a GAP record must account for the seqs before).

    Args:
        records: Consecutive records of one epoch, in seq order.
        after: The last accepted head, or None.
        known: Optional lookup of stored hashes, to recognise a re-sent list that ends before ``after``.

    Returns:
        The new head (``after`` itself when every record was a duplicate).

    Raises:
        ChainError: a record does not hash or link, a hole no GAP record explains, or a fork (same seq as
            accepted, different hash).
        RollbackError: an older epoch, or records that end before ``after`` and are not known duplicates.
    """
    if not records:
        if after is None:
            raise ChainError("empty chain and no accepted head")
        return after
    return _relate(records, after, known).head


@dataclass(frozen=True, slots=True)
class VerifiedBatch:
    """What :meth:`ChainVerifier.verify_batch` found; pass it to :meth:`ChainVerifier.commit` once stored.

    Attributes:
        device: The device.
        previous: The head accepted before this batch (None on first contact).
        head: The head after it.
        records: The records not accepted before, to store.
        duplicates: How many records were re-sent copies of accepted ones.
        dropped: GAP records among the new records, with how many records were never received.
        epoch_change: Set when the batch starts a newer epoch than ``previous``.
        checkpoint: The verified checkpoint: the batch's last record (equal to ``head`` unless every record was
            a stored duplicate behind the accepted head).
    """

    device: str
    previous: AuditHead | None
    head: AuditHead
    records: tuple[AuditRecord, ...]
    duplicates: int
    dropped: tuple[DroppedRange, ...]
    epoch_change: EpochChange | None
    checkpoint: Checkpoint


@dataclass(frozen=True, slots=True)
class CheckedUpload:
    """An upload whose checks that need no accepted head passed; made only by :meth:`ChainVerifier.check_upload`.

    Attributes:
        device: The device the upload came from.
        records: Its records (their hashes, links and epoch_start/gap rules verified).
        checkpoint: Its checkpoint, signature verified, naming ``device`` and the last record.
    """

    device: str
    records: tuple[AuditRecord, ...]
    checkpoint: Checkpoint


@dataclass
class ChainVerifier:
    """Verifies audit uploads against the last accepted head of each device (DESIGN.md §6).

    Holds only the heads, no records: the caller stores what :meth:`verify_batch` returns, then calls
    :meth:`commit`. Build it with the heads loaded from storage after a restart.
    """

    heads: dict[str, AuditHead] = field(default_factory=dict)

    def head(self, device: str) -> AuditHead | None:
        """The last accepted head of ``device``, or None."""
        return self.heads.get(device)

    def verify_batch(
        self,
        device: str,
        records: Sequence[AuditRecord],
        checkpoint: SignedCheckpoint,
        public_key: Ed25519PublicKey,
        *,
        known: KnownHash | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> VerifiedBatch:
        """Verify one upload: checkpoint signature, checkpoint = last record, chain continuity from the head.

        Does not change the accepted head; see :meth:`commit`.

        Args:
            device: The device the upload came from (its topic / certificate identity).
            records: The batch's records, in order; may be empty (a checkpoint alone re-confirms the head).
            checkpoint: The signed checkpoint sent with them.
            public_key: The device's public key.
            known: Optional lookup of stored hashes, to recognise re-sent batches behind the head.
            limits: Bounds for parsing the checkpoint.

        Raises:
            UnknownKeyError, VerificationError: bad signature, another device's checkpoint, or a checkpoint
                that does not name the batch's last record (e.g. a truncated batch).
            ChainError: broken chain, unexplained hole, fork.
            RollbackError: older epoch or a batch (or checkpoint) behind the accepted head.
            DecodeError: a malformed checkpoint body.
        """
        return self.verify_checked(
            self.check_upload(device, records, checkpoint, public_key, limits=limits), known=known
        )

    @staticmethod
    def check_upload(
        device: str,
        records: Sequence[AuditRecord],
        checkpoint: SignedCheckpoint,
        public_key: Ed25519PublicKey,
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> CheckedUpload:
        """The first half of :meth:`verify_batch`, which needs no accepted head (so no storage, no lock).

        Checkpoint signature, checkpoint names ``device`` and the last record, every record hashes and links to the
        one before it. :meth:`verify_checked` then relates the upload to the accepted head.

        Raises:
            UnknownKeyError, VerificationError, ChainError, DecodeError: as :meth:`verify_batch`, for these checks.
        """
        verified = verify_checkpoint(checkpoint, public_key, limits=limits)
        if verified.device != device:
            raise VerificationError(f"checkpoint names device {verified.device!r}, upload came from {device!r}")
        if records:
            if verified.head != records[-1].head:
                raise VerificationError(
                    f"checkpoint (epoch {verified.epoch} seq {verified.seq}) does not match the last record "
                    f"(epoch {records[-1].epoch} seq {records[-1].seq})"
                )
            _check_links(records)
        return CheckedUpload(device, tuple(records), verified)

    def verify_checked(self, checked: CheckedUpload, *, known: KnownHash | None = None) -> VerifiedBatch:
        """The second half of :meth:`verify_batch`: relate a checked upload to its device's accepted head.

        Raises:
            ChainError, RollbackError, VerificationError: as :meth:`verify_batch`, for these checks.
        """
        device, records, verified = checked.device, checked.records, checked.checkpoint
        after = self.heads.get(device)
        if records:
            outcome = _relate(records, after, known, links_checked=True)
            for record in outcome.new:
                if record.seq == 0 and _epoch_start_of(record).device != device:
                    raise ChainError(f"epoch {record.epoch} seq 0: epoch_start names another device")
            return VerifiedBatch(
                device=device,
                previous=after,
                head=outcome.head,
                records=outcome.new,
                duplicates=outcome.duplicates,
                dropped=outcome.dropped,
                epoch_change=outcome.epoch_change,
                checkpoint=verified,
            )
        self._check_bare_checkpoint(verified, after, known)
        assert after is not None
        return VerifiedBatch(device, after, after, (), 0, (), None, verified)

    @staticmethod
    def _check_bare_checkpoint(checkpoint: Checkpoint, after: AuditHead | None, known: KnownHash | None) -> None:
        if after is None:
            raise VerificationError("a checkpoint without records, and no accepted head to compare it with")
        if checkpoint.epoch > after.epoch or (checkpoint.epoch == after.epoch and checkpoint.seq > after.seq):
            raise VerificationError("checkpoint is ahead of the accepted head but the batch has no records")
        if (checkpoint.epoch, checkpoint.seq) == (after.epoch, after.seq):
            if checkpoint.head_hash != after.hash:
                raise ChainError(f"fork: checkpoint hash at seq {after.seq} differs from the accepted head")
            return
        # behind the head, in its epoch or an older one: a re-sent checkpoint if it names a stored record
        _require_stored(
            known,
            checkpoint.epoch,
            checkpoint.seq,
            checkpoint.head_hash,
            behind=f"checkpoint at epoch {checkpoint.epoch} seq {checkpoint.seq}, before the accepted head "
            f"(epoch {after.epoch} seq {after.seq})",
            what=f"checkpoint hash at seq {checkpoint.seq}",
        )

    def commit(self, result: VerifiedBatch) -> None:
        """Accept ``result.head`` as the device's head, after the caller stored ``result.records``.

        Raises:
            VerificationError: the head changed since ``result`` was verified (verify the batch again).
        """
        if self.heads.get(result.device) != result.previous:
            raise VerificationError(f"audit head of {result.device!r} changed since the batch was verified")
        self.heads[result.device] = result.head
