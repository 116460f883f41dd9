"""The error tree of the wire protocol.

``protocols/`` raises, never catches or logs: the drivers in ``agent/`` and ``controller/`` decide which
errors are normal. Every error carries a one-line message and :meth:`ProtocolError.diagnostics` gives a
longer text for humans (CLI output, reports).

::

    ProtocolError
     ├── DecodeError                   bytes, JSON or a field that is not what the schema says
     │    ├── UnknownTypeError         a message ``type`` this side does not know
     │    └── UnsupportedVersionError  a protocol major version this side does not speak
     ├── VerificationError             a signature, chain or policy check failed (fail closed)
     │    ├── UnknownKeyError          no signature by any trusted key
     │    ├── ThresholdError           fewer distinct trusted signatures than the threshold
     │    └── ChainError               an audit hash chain is broken (modified, dropped, reordered, forked)
     ├── ExpiredError                  metadata or a message past its expiry
     ├── RollbackError                 a version, generation or sequence number went backwards
     └── LengthOrHashMismatchError     bytes whose length or sha256 differ from the signed value
"""

from __future__ import annotations

__all__ = [
    "ChainError",
    "DecodeError",
    "ExpiredError",
    "LengthOrHashMismatchError",
    "ProtocolError",
    "RollbackError",
    "ThresholdError",
    "UnknownKeyError",
    "UnknownTypeError",
    "UnsupportedVersionError",
    "VerificationError",
]


class ProtocolError(Exception):
    """Root of every error raised by ``protocols/``."""

    hint: str = ""

    def diagnostics(self) -> str:
        """A multi-line explanation for humans: what failed and what usually causes it."""
        text = f"{type(self).__name__}: {self}"
        if self.hint:
            text += f"\n\n{self.hint}"
        return text


class DecodeError(ProtocolError):
    """Input is not well-formed: bad bytes, bad JSON, a missing or out-of-range field."""

    hint = "The message is malformed. It was produced by a buggy or hostile peer, or was truncated in transit."


class UnknownTypeError(DecodeError):
    """The message ``type`` is not one this side knows."""

    hint = "The peer speaks a message this version of edgefleet does not know; upgrade the older side."


class UnsupportedVersionError(DecodeError):
    """The protocol major version is not one this side speaks."""

    hint = "The peers speak different protocol major versions; upgrade the older side."


class VerificationError(ProtocolError):
    """A signature, chain or policy check failed. Verification always fails closed."""

    hint = "The data may have been tampered with, or signed by a key this side does not trust."


class UnknownKeyError(VerificationError):
    """No valid signature by any trusted key."""

    hint = "The data is signed only by keys this side does not trust (or not signed at all)."


class ThresholdError(VerificationError):
    """Fewer valid signatures by distinct trusted keys than the threshold requires."""

    hint = "Not enough distinct trusted keys signed this data; gather the missing signatures."


class ChainError(VerificationError):
    """An audit hash chain does not link: a record was modified, dropped, reordered, inserted or forked."""

    hint = "The audit log does not form one unbroken hash chain; treat the device's log as tampered."


class ExpiredError(ProtocolError):
    """Signed data is past its expiry time."""

    hint = "Signed data has expired; the signer must re-sign it (a frozen or stale feed looks like this)."


class RollbackError(ProtocolError):
    """A version, generation or sequence number is lower than one already accepted."""

    hint = "Older signed data was replayed, or local state was restored from an old copy."


class LengthOrHashMismatchError(ProtocolError):
    """Bytes whose length or sha256 differ from the signed value."""

    hint = "The bytes are not the ones that were signed: corrupted in transit, or tampered with."
