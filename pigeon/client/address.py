"""Where and how a client connects: ``pigeon://`` and ``pigeons://`` URLs, credentials, the TLS context.

``pigeon://user:password@host:3333`` connects in plain text, ``pigeons://...``
over TLS (the server's certificate checked against the system's CAs unless a
context says otherwise). User and password are percent-decoded, so a
password with ``@`` or ``:`` is written ``%40`` or ``%3A``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from pigeon.errors import InvalidArgumentError
from pigeon.protocol import DEFAULT_PORT

SCHEMES = {"pigeon": False, "pigeons": True}  # scheme -> TLS

TlsOption = ssl.SSLContext | bool | None


@dataclass(frozen=True)
class Address:
    """A broker's address as a URL gives it: host, port, optional credentials, and whether to use TLS."""

    host: str
    port: int
    user: str | None = None
    password: str | None = None
    tls: bool = False


def parse_url(url: str) -> Address:
    """The parts of a ``pigeon://[user:password@]host[:port]`` or ``pigeons://`` URL.

    Raises InvalidArgumentError for another scheme, a missing host, a bad
    port, a user or password that is not one word, or a path or query. A user
    without a password is left for the caller to complete (``pigeon-cli`` takes
    it from PIGEON_PASSWORD) or refuse (the clients do).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgumentError(f"bad broker URL {_hide_password(url)!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise InvalidArgumentError(
            f"a broker URL starts with pigeon:// or pigeons://, not {url.split(':')[0]!r}"
        )
    if not parts.hostname:
        raise InvalidArgumentError(f"no host in the broker URL {_hide_password(url)!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidArgumentError(f"a broker URL has no path or query: {_hide_password(url)!r}")
    user = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    check_words(user, password)
    return Address(parts.hostname, port or DEFAULT_PORT, user, password, SCHEMES[parts.scheme])


def check_credentials(user: str | None, password: str | None) -> None:
    """Raise InvalidArgumentError unless both or neither are given, each one word (no whitespace)."""
    if (user is None) != (password is None):
        raise InvalidArgumentError("a user needs a password and a password a user")
    check_words(user, password)


def check_words(user: str | None, password: str | None) -> None:
    """Raise InvalidArgumentError unless each one given is one word (no whitespace)."""
    for what, word in (("user", user), ("password", password)):
        if word is not None and (not word or len(word.split()) != 1 or word.strip() != word):
            raise InvalidArgumentError(f"the {what} must be one word without whitespace")


def tls_context(tls: TlsOption) -> ssl.SSLContext | None:
    """The client context for ``tls``: a context as given, ``True`` the system's default (the
    server's certificate and host name verified against the system's CAs), ``False``/None none."""
    if isinstance(tls, ssl.SSLContext):
        return tls
    return ssl.create_default_context() if tls else None


def url_keywords(url: str, tls: TlsOption) -> dict[str, Any]:
    """The keywords of a client for ``url``: host, port, user, password and tls.

    A ``pigeons://`` URL takes ``tls`` (a context, e.g. with a private CA)
    or else the system's default context; ``pigeon://`` refuses one.
    """
    address = parse_url(url)
    if not address.tls and tls:
        raise InvalidArgumentError("pigeon:// is plain text: use pigeons:// for TLS")
    if address.tls and not isinstance(tls, ssl.SSLContext):
        tls = True
    return {
        "host": address.host,
        "port": address.port,
        "user": address.user,
        "password": address.password,
        "tls": tls if address.tls else None,
    }


def _hide_password(url: str) -> str:
    """``url`` with any password replaced by ``***``, for error messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"
