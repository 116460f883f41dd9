"""The agent's link to the controller (DESIGN.md §5).

- :mod:`agent.link.enrollment` installs and loads the provisioning bundle (``state_dir/link/``).
- :mod:`agent.link.store` is the link's SQLite database (one writer thread): outbox, desired state, events.
- :mod:`agent.link.outbox` keeps what must reach the controller until its application-level ack.
- :mod:`agent.link.dispatch` verifies, persists and applies the signed desired state.
- :mod:`agent.link.state` builds the device's state message.
- :mod:`agent.link.mqtt` is the connection (the only agent module importing aiomqtt): :class:`AgentLink`.
"""

from pathlib import Path

__all__ = ["KEYRING_FILE", "bundle_path", "link_dir"]

KEYRING_FILE = "assignment-keys.json"
"""Under the link directory: the last verified assignment key list (canonical JSON; :mod:`agent.link.keyring`)."""


def link_dir(state_dir: Path) -> Path:
    """``state_dir/link``: the enrollment, its TLS files and the link's database."""
    return state_dir / "link"


def bundle_path(state_dir: Path) -> Path:
    """The installed provisioning bundle; the device is enrolled if it exists (see :mod:`agent.link.enrollment`).

    Here, not in :mod:`agent.link.enrollment`, so that the daemon can tell whether to start the link without
    importing the link's TLS, TUF and MQTT stack on a device that has none.
    """
    return link_dir(state_dir) / "bundle"
