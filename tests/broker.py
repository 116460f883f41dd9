"""A private Mosquitto broker for tests: free loopback port, generated config, stop / kill -9 / restart.

The broker runs as a child process with its own config, persistence directory and log file under a test's
temporary directory, so tests never touch the machine's own broker on 127.0.0.1:1883.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class BrokerTls:
    """TLS settings of the broker's listener."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = True
    use_identity_as_username: bool = True
    crlfile: Path | None = None


class Mosquitto:
    """One private ``mosquitto`` process."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls: BrokerTls | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
        persistence: bool = True,
        max_packet_size: int | None = None,
        max_queued_messages: int | None = None,
        extra_config: str = "",
        config_file: Path | None = None,
        port: int | None = None,
    ) -> None:
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed: run `make test` (it installs Debian's mosquitto)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()  # a given config_file names its own port: pass it here
        self.host = "127.0.0.1"
        self.log_file = workdir / "mosquitto.log"
        self._given_config = config_file
        self.config_file = config_file or workdir / "mosquitto.conf"
        self._tls = tls
        self._acl_file = acl_file
        self._allow_anonymous = allow_anonymous if allow_anonymous is not None else tls is None
        self._persistence = persistence
        self._max_packet_size = max_packet_size
        self._max_queued_messages = max_queued_messages
        self._extra = extra_config
        self._process: subprocess.Popen[bytes] | None = None

    def render_config(self) -> str:
        """The generated ``mosquitto.conf``."""
        lines = [
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self._allow_anonymous else 'false'}",
            f"persistence {'true' if self._persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to the `mosquitto` user, which cannot enter pytest's 0700
            # temporary directories; a test broker keeps the test runner's identity instead.
            lines.append("user root")
        if self._tls is not None:
            lines += [
                f"cafile {self._tls.cafile}",
                f"certfile {self._tls.certfile}",
                f"keyfile {self._tls.keyfile}",
                "tls_version tlsv1.2",
                f"require_certificate {'true' if self._tls.require_certificate else 'false'}",
                f"use_identity_as_username {'true' if self._tls.use_identity_as_username else 'false'}",
            ]
            if self._tls.crlfile is not None:
                lines.append(f"crlfile {self._tls.crlfile}")
        if self._acl_file is not None:
            lines.append(f"acl_file {self._acl_file}")
        if self._max_packet_size is not None:
            lines.append(f"max_packet_size {self._max_packet_size}")
        if self._max_queued_messages is not None:
            lines.append(f"max_queued_messages {self._max_queued_messages}")
        return "\n".join(lines) + "\n" + self._extra

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            return
        if self._given_config is None:
            self.config_file.write_text(self.render_config())
        stderr_file = self.workdir / "mosquitto.stderr"
        with stderr_file.open("ab") as stderr:
            self._process = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config_file)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = stderr_file.read_text(errors="replace")
                raise RuntimeError(f"mosquitto exited with {self._process.returncode}: {err}\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker with SIGTERM (it saves its persistence file) and wait for it."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Kill the broker with SIGKILL: nothing is saved since the last autosave."""
        self._signal(signal.SIGKILL, 10.0)

    def restart(self) -> None:
        """Stop (SIGTERM) and start again on the same port."""
        self.stop()
        self.start()

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._process = None

    def log(self) -> str:
        """The broker's log so far (for assertion messages); with a given config, what it wrote to stderr."""
        text = ""
        for path in (self.log_file, self.workdir / "mosquitto.stderr"):
            with contextlib.suppress(FileNotFoundError):
                text += path.read_text(errors="replace")
        return text

    def reload(self) -> None:
        """Send SIGHUP: the broker re-reads its configuration (ACL file included)."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGHUP)
