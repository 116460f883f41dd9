"""Who is calling, and what they may do.

A caller is identified by, in this order:

1. a bearer token (``Authorization: Bearer efa_...``) if one is presented: it must be valid and unrevoked, or
   the request is refused with 401 whatever else is true (fail closed: a wrong token never falls back to the
   peer's uid). An empty bearer value counts as no token, so clients that insist on an API key (the
   ``openai`` package) can pass ``""`` on the unix socket;
2. otherwise, on the unix socket, the peer's credentials from the kernel (``SO_PEERCRED``: pid, uid, gid),
   unless ``api.require_token`` is set;
3. on the TCP listener a token is always required (there is no trustworthy peer identity on TCP).

Policy (:class:`AccessPolicy`):

- *callers* (inference, model listing, metrics): any valid token with an ``infer`` or ``admin`` scope, or a
  peer whose uid is in ``allowed_uids`` or whose gid is in ``allowed_gids`` (both empty: every peer that can
  open the socket, whose mode and group are then the gate), or an admin peer;
- *inference on model N*: token scope ``infer``, ``infer:N`` or ``admin``; or an allowed peer;
- *admin*: token scope ``admin``, or a peer whose uid is in ``admin_uids`` (empty: root and the uid the agent
  runs as).

Peer credentials are read with ``SO_PEERCRED`` (Linux). Where the platform has no such option the peer is
unidentified and only tokens are accepted (fail closed).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from agent.api.tokens import TokenRecord, TokenStore
from agent.config import ApiConfig
from agent.errors import AuthenticationError, PermissionDeniedError

__all__ = ["AccessPolicy", "Identity", "PeerCredentials", "peer_credentials"]

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The process at the other end of a unix socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Identity:
    """The authenticated caller of one request."""

    transport: Literal["unix", "tcp"]
    peer: PeerCredentials | None
    token: TokenRecord | None

    @property
    def actor(self) -> str:
        """A short, log-safe name of the caller: ``token:<id>`` or ``uid:<uid>`` (or ``anonymous``)."""
        if self.token is not None:
            return f"token:{self.token.id}"
        if self.peer is not None:
            return f"uid:{self.peer.uid}"
        return "anonymous"


def peer_credentials(request: web.Request) -> PeerCredentials | None:
    """The ``SO_PEERCRED`` credentials of the request's unix-socket peer, or ``None`` (TCP, other OS)."""
    transport = request.transport
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def _transport_kind(request: web.Request) -> Literal["unix", "tcp"]:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return "unix" if sock is not None and sock.family == socket.AF_UNIX else "tcp"


class AccessPolicy:
    """Authenticates requests and answers "may this identity do that?" (raising when not)."""

    def __init__(self, config: ApiConfig, tokens: TokenStore, *, agent_uid: int | None = None) -> None:
        self._config = config
        self._tokens = tokens
        own_uid = os.getuid() if agent_uid is None else agent_uid
        self._admin_uids = frozenset(config.admin_uids) if config.admin_uids else frozenset({0, own_uid})

    async def identify(self, request: web.Request) -> Identity:
        """Authenticate the request.

        Raises:
            AuthenticationError: a malformed, wrong or revoked token; or no token where one is required.
        """
        kind = _transport_kind(request)
        peer = peer_credentials(request) if kind == "unix" else None
        header = request.headers.get("Authorization")
        token: TokenRecord | None = None
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() != "bearer":
                raise AuthenticationError("the Authorization header must be 'Bearer <token>'")
            value = value.strip()
            if value:
                token = await asyncio.to_thread(self._tokens.verify, value)
        if token is None and (kind == "tcp" or self._config.require_token or peer is None):
            raise AuthenticationError("an API token is required (Authorization: Bearer <token>)")
        return Identity(transport=kind, peer=peer, token=token)

    def _peer_allowed(self, peer: PeerCredentials | None) -> bool:
        if peer is None:
            return False
        if peer.uid in self._admin_uids:
            return True
        if not self._config.allowed_uids and not self._config.allowed_gids:
            return True
        return peer.uid in self._config.allowed_uids or peer.gid in self._config.allowed_gids

    def require_caller(self, identity: Identity) -> None:
        """Allow any identified caller with some right to use the API (listing, metrics).

        Raises:
            PermissionDeniedError: a token without scopes that grant anything, or a peer not allowed.
        """
        if identity.token is not None:
            if identity.token.is_admin or any(s == "infer" or s.startswith("infer:") for s in identity.token.scopes):
                return
            raise PermissionDeniedError("this token has no scope that allows using the API")
        if not self._peer_allowed(identity.peer):
            raise PermissionDeniedError(f"{identity.actor} is not allowed to use the API")

    def may_infer(self, identity: Identity, model_name: str) -> bool:
        """Whether ``identity`` may run inference on (or see) the model named ``model_name``."""
        if identity.token is not None:
            return identity.token.allows_infer(model_name)
        return self._peer_allowed(identity.peer)

    def require_infer(self, identity: Identity, model_name: str) -> None:
        """Allow inference on ``model_name`` or raise.

        Raises:
            PermissionDeniedError: the token's scopes or the peer's uid do not allow it.
        """
        if not self.may_infer(identity, model_name):
            if identity.token is not None:
                raise PermissionDeniedError(f"this token's scopes do not allow inference on model {model_name!r}")
            raise PermissionDeniedError(f"{identity.actor} is not allowed to use the API")

    def require_admin(self, identity: Identity) -> None:
        """Allow admin routes or raise.

        Raises:
            PermissionDeniedError: neither an ``admin`` token nor an admin uid.
        """
        if identity.token is not None:
            if identity.token.is_admin:
                return
            raise PermissionDeniedError("this token has no admin scope")
        if identity.peer is None or identity.peer.uid not in self._admin_uids:
            raise PermissionDeniedError(f"{identity.actor} is not allowed to use admin routes")
