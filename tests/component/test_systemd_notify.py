"""The agent speaks systemd's notify protocol: READY=1 once serving, watchdog pings, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.systemd import SystemdNotifier, watchdog_loop

pytestmark = pytest.mark.component


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, Path]]:
    """A datagram socket standing in for systemd's notify socket (short path: sun_path is 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="efn-"))
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield sock, path
    sock.close()
    path.unlink(missing_ok=True)
    directory.rmdir()


def _receive(sock: socket.socket, until: float) -> list[tuple[float, str]]:
    """Every datagram received before the monotonic deadline ``until``, with its arrival time."""
    got: list[tuple[float, str]] = []
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        got.append((time.monotonic(), data.decode()))
    return got


def test_daemon_ready_watchdog_and_stopping(notify_socket: tuple[socket.socket, Path], tmp_path: Path) -> None:
    """`edge-agent run` under NOTIFY_SOCKET sends READY=1 when the socket listens, pings, and STOPPING=1."""
    sock, path = notify_socket
    state = tmp_path / "state"
    api_socket = Path(tempfile.mkdtemp(prefix="efa-")) / "api.sock"
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "--state-dir", str(state), "--socket", str(api_socket), "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready_at = None
        deadline = time.monotonic() + 60
        messages: list[tuple[float, str]] = []
        while ready_at is None and time.monotonic() < deadline:
            for at, text in _receive(sock, min(deadline, time.monotonic() + 1)):
                messages.append((at, text))
                if "READY=1" in text.splitlines():
                    ready_at = at
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert ready_at is not None, f"no READY=1; got {messages}"
        assert api_socket.exists(), "READY=1 was sent before the API socket existed"
        pings = [text for _, text in _receive(sock, time.monotonic() + 2.2) if text == "WATCHDOG=1"]
        assert len(pings) >= 3, f"expected a ping every 0.5 s, got {pings}"
        process.send_signal(signal.SIGTERM)
        tail = [text for _, text in _receive(sock, time.monotonic() + 5)]
        assert process.wait(30) == 0
        assert any("STOPPING=1" in text.splitlines() for text in tail), tail
        assert not api_socket.exists(), "the socket file is removed on a clean exit"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


async def test_blocked_event_loop_stops_pings(notify_socket: tuple[socket.socket, Path]) -> None:
    """While the event loop is blocked no ping is sent, so systemd's watchdog would fire."""
    sock, path = notify_socket
    arrivals: list[float] = []
    done = threading.Event()

    def reader() -> None:  # timestamps each datagram as it arrives, off the blocked loop
        sock.settimeout(0.05)
        while not done.is_set():
            try:
                sock.recv(64)
            except TimeoutError:
                continue
            arrivals.append(time.monotonic())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    task = asyncio.create_task(watchdog_loop(notifier, lambda: True))
    try:
        await asyncio.sleep(0.5)
        blocked_from = time.monotonic()
        time.sleep(1.0)  # noqa: ASYNC251 - the point: a blocking call on the loop starves the watchdog task
        blocked_until = time.monotonic()
        await asyncio.sleep(0.5)
    finally:
        task.cancel()
        notifier.close()
        done.set()
        thread.join()
    before = [t for t in arrivals if t < blocked_from]
    inside = [t for t in arrivals if blocked_from + 0.02 < t < blocked_until]
    after = [t for t in arrivals if t > blocked_until]
    assert len(before) >= 3, arrivals
    assert inside == [], f"pings arrived while the loop was blocked: {inside}"
    assert len(after) >= 3, arrivals


async def test_unhealthy_component_withholds_pings(notify_socket: tuple[socket.socket, Path]) -> None:
    """When the health probe reports no progress, no WATCHDOG=1 is sent."""
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
    healthy = True
    task = asyncio.create_task(watchdog_loop(notifier, lambda: healthy))
    await asyncio.sleep(0.2)
    sock.setblocking(False)
    before = _drain(sock)
    healthy = False
    await asyncio.sleep(0.1)
    _drain(sock)  # a ping may have been in flight when the probe flipped
    await asyncio.sleep(0.4)
    during = _drain(sock)
    task.cancel()
    notifier.close()
    assert before >= 2
    assert during == 0


def _drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(64)
        except BlockingIOError:
            return count
        count += 1


def test_notifier_without_socket_is_a_noop() -> None:
    """Outside systemd (no NOTIFY_SOCKET) notifications are silently skipped and the watchdog is off."""
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready() is False


def test_watchdog_pid_of_another_process_disables_watchdog() -> None:
    """WATCHDOG_PID naming another process means the watchdog is not ours to feed."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_interval is None
