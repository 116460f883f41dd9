"""The systemd notify protocol (``sd_notify``), spoken directly over ``NOTIFY_SOCKET``.

No libsystemd binding is needed: a notification is one datagram of ``KEY=VALUE`` lines sent to the unix
socket named by ``NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). When the variable is not set
(not run by systemd, or ``Type=simple``), every call is a no-op, so the daemon speaks the protocol
unconditionally.

The watchdog: systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``); the daemon must send ``WATCHDOG=1`` more
often than that. :func:`watchdog_loop` pings at half the interval, from the event loop itself, and only while
the supplied health probe says the rest of the process makes progress. A blocked event loop therefore stops the
pings, and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

__all__ = ["SystemdNotifier", "watchdog_loop"]

log = structlog.get_logger(__name__)


class SystemdNotifier:
    """Sends notifications to systemd, or does nothing when not supervised by it."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address.startswith("@"):
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        self._watchdog_usec: int | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or (pid.isdigit() and int(pid) == os.getpid())):
            self._watchdog_usec = int(usec)
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when ``NOTIFY_SOCKET`` names a socket."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or ``None`` when the watchdog is off."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    def notify(self, **fields: str | int) -> bool:
        """Send one notification (e.g. ``notify(READY=1, STATUS="serving")``); False if it could not be sent."""
        if self._address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # never block the event loop: a receiver that stopped reading (its queue full) costs a lost ping,
            # which the watchdog tolerates, not a frozen daemon
            self._socket.sendto(message, socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc))
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1``: the API listens and the registry is open."""
        return self.notify(READY=1, STATUS=status) if status else self.notify(READY=1)

    def stopping(self) -> bool:
        """``STOPPING=1``: draining before exit."""
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """``STATUS=...``: one line shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the process is alive and making progress."""
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        """Close the datagram socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def watchdog_loop(notifier: SystemdNotifier, healthy: Callable[[], bool]) -> None:
    """Ping the watchdog at half its interval while ``healthy()`` holds; return at once if it is off.

    Because the pings come from a task on the event loop, a blocked loop sends none. ``healthy`` lets the
    daemon also withhold pings when a worker thread is wedged (for example a native call that never returns).
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    period = interval / 2
    while True:
        if healthy():
            notifier.watchdog()
        else:
            log.error("withholding watchdog ping: a component reports no progress")
        await asyncio.sleep(period)
