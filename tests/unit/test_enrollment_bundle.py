"""Unit tests for protocols/enrollment.py: the provisioning bundle's encoding and every check on it."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import pki
from protocols.enrollment import HOST_RE, BrokerAddress, EnrollmentBundle, decode_bundle, encode_bundle
from protocols.errors import DecodeError, ExpiredError, ProtocolError, UnknownKeyError, VerificationError
from protocols.keys import generate_private_key, keyid, private_key_to_pem, public_key_to_pem
from protocols.limits import DEVICE_ID_RE

pytestmark = pytest.mark.unit

CA = pki.create_ca()
OTHER_CA = pki.create_ca("another CA")
CONTROLLER = generate_private_key()
STRANGER = generate_private_key()
SIGNING = generate_private_key()


def make_bundle(
    device: str = "dev-1", *, ca: pki.Issued = CA, cn: str | None = None, **cert: object
) -> EnrollmentBundle:
    issued = pki.issue_client_cert(ca, cn or device, **cert)  # type: ignore[arg-type]
    return EnrollmentBundle(
        device=device,
        issued_ts_ms=1_700_000_000_000,
        broker=BrokerAddress("broker.example", 8883, 2 * 1024 * 1024),
        ca_pem=pki.cert_pem(CA.cert).decode(),
        cert_pem=pki.cert_pem(issued.cert).decode(),
        tls_key_pem=pki.key_pem(issued.key).decode(),
        signing_key_pem=private_key_to_pem(SIGNING).decode(),
        controller_keys={keyid(CONTROLLER): public_key_to_pem(CONTROLLER).decode()},
    )


BUNDLE = make_bundle()
ENCODED = encode_bundle(BUNDLE, [CONTROLLER])


def test_round_trip() -> None:
    """A bundle made by the controller decodes to the same bundle, with usable keys."""
    decoded = decode_bundle(ENCODED)
    assert decoded == BUNDLE
    assert decoded.signing_key().public_key().public_bytes_raw() == SIGNING.public_key().public_bytes_raw()
    assert list(decoded.controller_public_keys()) == [keyid(CONTROLLER)]
    assert decode_bundle(ENCODED, pinned_keyids=[keyid(CONTROLLER)]) == BUNDLE


@settings(max_examples=25, deadline=None)
@given(
    device=st.from_regex(DEVICE_ID_RE, fullmatch=True),
    host=st.from_regex(HOST_RE, fullmatch=True).filter(lambda h: len(h) <= 253),
    port=st.integers(1, 65535),
    packet=st.integers(1024, 268_435_455),
)
def test_round_trip_of_any_valid_bundle(device: str, host: str, port: int, packet: int) -> None:
    """Any valid device id, broker address and packet limit survive encoding and decoding unchanged."""
    bundle = dataclasses.replace(make_bundle(device), broker=BrokerAddress(host, port, packet))
    assert decode_bundle(encode_bundle(bundle, [CONTROLLER])) == bundle


@given(data=st.data())
def test_flipping_any_byte_is_rejected(data: st.DataObject) -> None:
    """Flipping any bits of any byte of a bundle file makes decoding raise a ProtocolError, never return."""
    corrupted = bytearray(ENCODED)
    position = data.draw(st.integers(0, len(corrupted) - 1), label="position")
    corrupted[position] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(ProtocolError):
        decode_bundle(bytes(corrupted))


@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_are_rejected(data: bytes) -> None:
    """Arbitrary bytes are never a bundle, and only ever raise a ProtocolError."""
    with pytest.raises(ProtocolError):
        decode_bundle(data)


def test_pinned_controller_key_is_required() -> None:
    """A bundle signed by another controller key than the pinned one is refused."""
    with pytest.raises(UnknownKeyError):
        decode_bundle(ENCODED, pinned_keyids=[keyid(STRANGER)])


def test_bundle_signed_by_a_key_it_does_not_name_is_refused() -> None:
    """A bundle's signature must come from the controller keys it names (an impostor's bundle fails)."""
    impostor = dataclasses.replace(BUNDLE, controller_keys={keyid(STRANGER): public_key_to_pem(STRANGER).decode()})
    forged = encode_bundle(impostor, [STRANGER]).replace(keyid(STRANGER).encode(), keyid(CONTROLLER).encode())
    with pytest.raises(ProtocolError):
        decode_bundle(forged)
    with pytest.raises(ValueError, match="signed by the controller keys it names"):
        encode_bundle(BUNDLE, [STRANGER])


@pytest.mark.parametrize(
    ("bundle", "error", "text"),
    [
        (make_bundle("dev-1", cn="dev-2"), VerificationError, "does not name exactly the device"),
        (make_bundle("dev-1", ca=OTHER_CA), VerificationError, "not issued by the bundled CA"),
        (
            dataclasses.replace(BUNDLE, tls_key_pem=make_bundle().tls_key_pem),
            VerificationError,
            "not the key of the device certificate",
        ),
        (
            make_bundle(
                not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10),
                not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
            ),
            ExpiredError,
            "valid from",
        ),
        (dataclasses.replace(BUNDLE, signing_key_pem=pki.key_pem(CA.key).decode()), DecodeError, "Ed25519"),
        (dataclasses.replace(BUNDLE, ca_pem=BUNDLE.cert_pem), VerificationError, "not a CA"),
    ],
    ids=["wrong-cn", "other-ca", "key-mismatch", "expired", "signing-key-not-ed25519", "ca-not-a-ca"],
)
def test_inconsistent_credentials_are_refused(bundle: EnrollmentBundle, error: type[Exception], text: str) -> None:
    """A correctly signed bundle whose certificate, keys or CA do not fit together is refused, saying why."""
    with pytest.raises(error, match=text):
        decode_bundle(encode_bundle(bundle, [CONTROLLER]))


def test_expired_bundle_can_be_read_without_the_time_check() -> None:
    """An installed bundle whose certificate expired can still be read (to learn its device) when asked to."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    expired = make_bundle(not_before=past - dt.timedelta(days=9), not_after=past)
    encoded = encode_bundle(expired, [CONTROLLER])
    assert decode_bundle(encoded, check_time=False).device == "dev-1"


def test_controller_certificate_names_are_never_device_ids() -> None:
    """No device can be enrolled under a controller's identity: controller CNs fail the device id syntax."""
    for name in ("main", "second", "a", "x" * 32):
        assert not DEVICE_ID_RE.fullmatch(pki.controller_common_name(name))
