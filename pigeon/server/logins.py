"""The server's half of authentication: answers ``CONNECT <user> <password>``, reloads the users file.

The core holds a connection's identity and compiled permissions and stops
reading it while its login is checked; this module checks the password off the
event loop (scrypt takes tens of milliseconds), delays the answer when the
address keeps failing (``LoginThrottle``), then grants the user's permissions
and answers (``broker.grant``, ``broker.auth_result``). It also remembers which
user each connection is, so that a reload (SIGHUP) can close the connections
of removed users and re-grant changed ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Mapping
from typing import Protocol

from pigeon._core import Broker
from pigeon.server.throttle import LoginThrottle
from pigeon.server.tls import certificate_user
from pigeon.server.users import User, UsersError, load_users

log = logging.getLogger("pigeon")


class Peer(Protocol):
    """What the login flow needs of a client connection."""

    host: str  # the peer's address, without the port
    peer: str  # host:port, for log lines

    def close(self) -> None:
        """Close after flushing what was already written."""


class Logins:
    """Checks logins against the users file at ``path`` for ``broker`` (whose ``on_auth`` it sets).

    ``connections`` maps the core's handles to the open connections. With ``map_certificates``
    (``--tls-map-user``), a client certificate whose commonName is a user of the file logs its
    connection in as that user.
    """

    def __init__(
        self,
        broker: Broker,
        path: str | os.PathLike[str],
        connections: Mapping[int, Peer],
        map_certificates: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.map_certificates = map_certificates
        self.users = load_users(self.path)
        self.throttle = LoginThrottle()
        self._broker = broker
        self._connections = connections
        # the user each logged-in (or certificate-mapped) connection is
        self._identities: dict[int, str] = {}
        self._checks: set[asyncio.Task[None]] = set()
        # a pool of its own: logins never wait behind other work, nor hold more than one scrypt per core
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=os.cpu_count() or 2, thread_name_prefix="pigeon-login"
        )
        broker.on_auth = self._on_auth

    def _grant(self, handle: int, user: User) -> None:
        self._broker.grant(handle, user.name, user.publish, user.subscribe, user.admin)
        self._identities[handle] = user.name

    def opened(self, handle: int, conn: Peer, transport: asyncio.BaseTransport) -> None:
        """A new connection: with ``map_certificates``, preset its identity from its client certificate.

        A bare CONNECT then logs in as the user its commonName names. A certificate that names no
        user of the file gives no identity: that connection logs in with a password.
        """
        if not self.map_certificates:
            return
        name = certificate_user(transport)
        user = self.users.get(name) if name is not None else None
        if user is not None:
            self._grant(handle, user)
            log.debug("connection %d from %s: certificate of user %r", handle, conn.peer, user.name)
        elif name is not None:
            log.warning(
                "connection %d from %s: certificate of %r, not a user of %s",
                handle,
                conn.peer,
                name,
                self.path,
            )

    def user_of(self, handle: int) -> User | None:
        """The user connection ``handle`` is logged in as (as the users file says now), or None."""
        name = self._identities.get(handle)
        return None if name is None else self.users.get(name)

    def closed(self, handle: int) -> None:
        """The connection ``handle`` is gone."""
        self._identities.pop(handle, None)

    def _on_auth(self, handle: int, user: bytes, password: bytes) -> None:
        conn = self._connections.get(handle)
        if conn is None:
            return
        loop = asyncio.get_running_loop()
        answer_at = loop.time() + self.throttle.delay(conn.host, loop.time())
        task = loop.create_task(self._check(handle, conn, user, password, answer_at))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, handle: int, conn: Peer, name: bytes, password: bytes, answer_at: float) -> None:
        loop = asyncio.get_running_loop()
        checked = self.users
        found = await loop.run_in_executor(self._executor, checked.check, name, password)
        delay = answer_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._connections.get(handle) is not conn:
            return  # closed meanwhile (and the handle perhaps reused)
        # a reload during the check: the user must still exist with the password checked
        user = self.users.get(found.name) if found is not None else None
        ok = found is not None and user is not None and user.password == found.password
        if user is not None and ok:
            self._grant(handle, user)
            log.debug("connection %d from %s: logged in as %r", handle, conn.peer, user.name)
        else:
            self.throttle.failed(conn.host, loop.time())
            log.warning(
                "connection %d from %s: authentication failed for user %r",
                handle,
                conn.peer,
                name.decode(errors="backslashreplace"),
            )
        self._broker.auth_result(handle, ok)

    def reload(self) -> bool:
        """Read the users file again and apply it to the open connections; False (old rules kept) if
        it cannot be used.

        Connections of users no longer in the file are closed; users whose permissions changed are
        granted the new ones (which ends their subscriptions no longer allowed).
        """
        try:
            new = load_users(self.path)
        except UsersError as exc:
            log.error("reload refused, the previous %d users stay: %s", len(self.users), exc)
            return False
        old, self.users = self.users, new
        closed = regranted = 0
        for handle, name in list(self._identities.items()):
            user = new.get(name)
            conn = self._connections.get(handle)
            if conn is None:
                continue
            if user is None:
                log.warning(
                    "closing connection %d from %s: user %r is no longer in %s",
                    handle,
                    conn.peer,
                    name,
                    self.path,
                )
                del self._identities[handle]
                conn.close()
                closed += 1
            elif _permissions(user) != _permissions(old.get(name)):
                self._grant(handle, user)
                regranted += 1
        added = len(set(new.by_name) - set(old.by_name))
        removed = len(set(old.by_name) - set(new.by_name))
        log.info(
            "reloaded %s: %d users (%d added, %d removed); %d connections closed, %d re-granted",
            self.path,
            len(new),
            added,
            removed,
            closed,
            regranted,
        )
        return True

    def stats(self) -> dict[str, int]:
        """The login figures kept here (the core counts logins and failures itself)."""
        return {"logins_throttled": self.throttle.throttled}

    def stop(self) -> None:
        """Drop the checks still running (their connections are closing) and the thread pool."""
        for task in self._checks:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _permissions(user: User | None) -> tuple[object, ...] | None:
    return None if user is None else (user.publish, user.subscribe, user.admin)
