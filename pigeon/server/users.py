"""The users file (``pigeon --users FILE``): user records, password hashes and their checks.

The file is TOML::

    [users.worker]
    password = "scrypt$16384$8$1$<salt>$<hash>"   # from `pigeon passwd`
    subscribe = ["orders.>", "jobs"]
    publish = ["results.>"]
    [users.ops]
    password = "scrypt$..."
    admin = true
    [users.node]                                  # what cluster nodes log in as (--node-user)
    password = "scrypt$..."
    cluster = true

A password is kept as ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (salt and hash in
standard base64): ``hashlib.scrypt`` with cost ``n``, block size ``r`` and
parallelism ``p``, 32 bytes long. Checks take as long for an unknown user as
for a known one (a dummy hash is spent), and compare in constant time.
Patterns follow the NATS rules: tokens split on ``.``, ``*`` is one token,
``>`` (last only) one or more trailing tokens. docs/security.md describes it all.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import hmac
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from pigeon.protocol import topic_problem

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# Django's scrypt parameters: about 16 MiB and 50-100 ms per hash.
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# what a users file may ask of one check: a hash is computed at every login
SCRYPT_MAX_N = 1 << 20
SCRYPT_MAX_R = 64
SCRYPT_MAX_P = 16
SCRYPT_MAX_MEMORY = 1 << 30

HASH_SCHEME = "scrypt"
USER_KEYS = frozenset({"password", "publish", "subscribe", "admin", "cluster"})


class UsersError(ValueError):
    """A users file that cannot be used; the text names the file, the user and the field."""


@dataclasses.dataclass(frozen=True)
class PasswordHash:
    """A parsed ``scrypt$n$r$p$salt$hash`` line."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def __str__(self) -> str:
        salt = base64.b64encode(self.salt).decode()
        digest = base64.b64encode(self.digest).decode()
        return f"{HASH_SCHEME}${self.n}${self.r}${self.p}${salt}${digest}"

    def derive(self, password: bytes) -> bytes:
        """The scrypt key of ``password`` with this hash's salt and parameters."""
        return hashlib.scrypt(
            password,
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            dklen=len(self.digest),
            maxmem=_scrypt_memory(self.n, self.r, self.p) + (1 << 20),
        )

    def matches(self, password: bytes) -> bool:
        """Whether ``password`` is the one hashed (constant-time comparison)."""
        return hmac.compare_digest(self.derive(password), self.digest)


def _scrypt_memory(n: int, r: int, p: int) -> int:
    """Bytes scrypt needs (OpenSSL's estimate: the V array plus the B blocks)."""
    return 128 * r * (n + p + 2)


def hash_password(password: str | bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The ``scrypt$...`` line for ``password``, with a fresh random salt."""
    raw = password.encode() if isinstance(password, str) else password
    fresh = PasswordHash(n, r, p, os.urandom(SALT_BYTES), b"\0" * HASH_BYTES)
    return str(dataclasses.replace(fresh, digest=fresh.derive(raw)))


def parse_hash(text: str) -> PasswordHash:
    """A ``scrypt$n$r$p$salt$hash`` line; ValueError saying what is wrong with it."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != HASH_SCHEME:
        raise ValueError("not a scrypt$n$r$p$salt$hash line (make one with `pigeon passwd`)")
    try:
        n, r, p = (int(part) for part in parts[1:4])
    except ValueError:
        raise ValueError("n, r and p must be whole numbers") from None
    if n < 2 or n > SCRYPT_MAX_N or n & (n - 1):
        raise ValueError(f"n must be a power of 2 from 2 to {SCRYPT_MAX_N}, not {n}")
    if not 1 <= r <= SCRYPT_MAX_R or not 1 <= p <= SCRYPT_MAX_P:
        raise ValueError(f"r must be from 1 to {SCRYPT_MAX_R} and p from 1 to {SCRYPT_MAX_P}")
    if _scrypt_memory(n, r, p) > SCRYPT_MAX_MEMORY:
        raise ValueError(f"n={n}, r={r}, p={p} would take more than {SCRYPT_MAX_MEMORY >> 20} MiB per check")
    try:
        salt, digest = (base64.b64decode(part, validate=True) for part in parts[4:])
    except binascii.Error:
        raise ValueError("salt and hash must be base64") from None
    if not salt or len(digest) < 16:
        raise ValueError("salt must not be empty and the hash must be at least 16 bytes")
    return PasswordHash(n, r, p, salt, digest)


def check_pattern(pattern: str) -> None:
    """Raise ValueError unless ``pattern`` is a topic, or a topic with whole ``*`` and ``>`` tokens.

    ``>`` may only be the last token; no token may be empty.
    """
    problem = topic_problem(pattern)
    if problem is not None:
        raise ValueError(problem.replace("topic", "pattern", 1))
    tokens = pattern.split(".")
    if "" in tokens:
        raise ValueError(f"pattern {pattern!r} has an empty token (two dots, or a dot at an end)")
    if ">" in tokens[:-1]:
        raise ValueError(f"pattern {pattern!r}: '>' may only be the last token")


def check_user_name(name: str) -> None:
    """Raise ValueError unless ``name`` can be sent as one word of ``CONNECT <user> <password>``."""
    problem = topic_problem(name)
    if problem is not None:
        raise ValueError(problem.replace("topic", "user name", 1))


@dataclasses.dataclass(frozen=True)
class User:
    """One user of the file: password hash and what it may do (``admin`` may do everything;
    ``cluster``: act as a cluster node towards other nodes, ``CLUSTER REPLICATE``)."""

    name: str
    password: PasswordHash
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    admin: bool = False
    cluster: bool = False

    @property
    def may_replicate(self) -> bool:
        """Whether this user may open a replication stream (``CLUSTER REPLICATE``): a node user."""
        return self.cluster or self.admin


class Users:
    """The users of one users file, by name, and the password check."""

    def __init__(self, users: Mapping[str, User]) -> None:
        self.by_name: dict[str, User] = dict(users)
        self._dummy = _dummy_hash(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: str) -> User | None:
        """The user called ``name``, or None."""
        return self.by_name.get(name)

    def check(self, name: bytes, password: bytes) -> User | None:
        """The user when ``name`` and ``password`` match, else None.

        An unknown name spends a hash as long as a known one, so that the time
        taken does not tell which names exist. Slow: run it off the event loop.
        """
        try:
            user = self.by_name.get(name.decode())
        except UnicodeDecodeError:
            user = None
        expected = user.password if user is not None else self._dummy
        matches = expected.matches(password)
        return user if matches and user is not None else None


def _dummy_hash(users: Iterable[User]) -> PasswordHash:
    """A hash of a random password, with the parameters most users' hashes have (so equally slow)."""
    costs = collections.Counter((u.password.n, u.password.r, u.password.p) for u in users)
    n, r, p = costs.most_common(1)[0][0] if costs else (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return PasswordHash(n, r, p, os.urandom(SALT_BYTES), os.urandom(HASH_BYTES))


def _patterns(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise UsersError(f"{where}: must be a list of strings")
    for pattern in value:
        try:
            check_pattern(pattern)
        except ValueError as exc:
            raise UsersError(f"{where}: {exc}") from None
    return tuple(value)


def parse_users(document: Mapping[str, Any], source: str = "users file") -> Users:
    """The users of a parsed TOML document; UsersError naming ``source``, the user and the field."""
    extra = set(document) - {"users"}
    if extra:
        raise UsersError(f"{source}: unknown top-level key(s) {sorted(extra)} (only [users.<name>] tables)")
    table = document.get("users", {})
    if not isinstance(table, dict):
        raise UsersError(f"{source}: 'users' must be a table of [users.<name>] tables")
    users: dict[str, User] = {}
    for name, fields in table.items():
        where = f"{source}: user {name!r}"
        try:
            check_user_name(name)
        except ValueError as exc:
            raise UsersError(f"{where}: {exc}") from None
        if not isinstance(fields, dict):
            raise UsersError(f"{where}: must be a table ([users.{name}])")
        unknown = set(fields) - USER_KEYS
        if unknown:
            raise UsersError(f"{where}: unknown field(s) {sorted(unknown)} (known: {sorted(USER_KEYS)})")
        if "password" not in fields:
            raise UsersError(f"{where}: password: missing (make a hash with `pigeon passwd`)")
        if not isinstance(fields["password"], str):
            raise UsersError(f"{where}: password: must be a string")
        try:
            password = parse_hash(fields["password"])
        except ValueError as exc:
            raise UsersError(f"{where}: password: {exc}") from None
        flags = {key: fields.get(key, False) for key in ("admin", "cluster")}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise UsersError(f"{where}: {key}: must be true or false")
        users[name] = User(
            name,
            password,
            publish=_patterns(f"{where}: publish", fields.get("publish", [])),
            subscribe=_patterns(f"{where}: subscribe", fields.get("subscribe", [])),
            **flags,
        )
    return Users(users)


def load_users(path: str | os.PathLike[str]) -> Users:
    """Read and check the users file at ``path``; UsersError (naming the file) when it cannot be used."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise UsersError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsersError(f"{source}: not valid TOML: {exc}") from None
    return parse_users(document, source)
