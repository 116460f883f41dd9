"""The agent's link to the controller (DESIGN.md §5).

- :mod:`agent.link.enrollment` installs and loads the provisioning bundle (``state_dir/link/``).
- :mod:`agent.link.store` is the link's SQLite database (one writer thread): outbox, desired state, events.
- :mod:`agent.link.outbox` keeps what must reach the controller until its application-level ack.
- :mod:`agent.link.dispatch` verifies, persists and applies the signed desired state.
- :mod:`agent.link.state` builds the device's state message.
- :mod:`agent.link.mqtt` is the connection (the only agent module importing aiomqtt): :class:`AgentLink`.
"""
