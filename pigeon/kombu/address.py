"""Where a kombu connection points: its URL (or keywords), credentials and TLS context, for ``Wire``.

The transport parses its own URLs (``Transport.can_parse_url``): kombu hands
over ``pigeon://user:password@host:3333`` or ``pigeons://...`` whole, and
``pigeon.client.address`` reads it as ``Client.from_url`` does (user and
password percent-decoded). kombu's TLS option (``Connection(ssl=...)``,
Celery's ``broker_use_ssl``) is an ``ssl.SSLContext``, True (the system's
CAs), or a dict of ``ca_certs``, ``certfile``, ``keyfile`` and ``cert_reqs``
as kombu's AMQP transport takes it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from pigeon.client.address import SCHEMES, TlsOption, check_credentials, tls_context, url_keywords
from pigeon.errors import InvalidArgumentError
from pigeon.protocol import DEFAULT_PORT

SSL_KEYS = frozenset({"ca_certs", "certfile", "keyfile", "cert_reqs"})


@dataclass(frozen=True)
class BrokerAddress:
    """What ``Wire`` connects to: host, port, credentials (both or neither), TLS context (None: plain)."""

    host: str
    port: int
    user: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None


def broker_address(client: Any) -> BrokerAddress:
    """The address of the kombu ``Connection`` ``client``.

    Its ``hostname`` is a whole URL, or a host with ``port``, ``userid``,
    ``password`` and ``transport`` (``pigeons`` for TLS) given apart.
    Raises InvalidArgumentError for a bad URL, a user without a password (or
    the reverse), or a TLS option with ``pigeon://``.
    """
    tls = tls_option(client.ssl)
    hostname = client.hostname or "127.0.0.1"
    if "://" in hostname:
        keywords = url_keywords(hostname, tls)
    else:
        over_tls = SCHEMES.get(client.transport_cls, False)
        keywords = url_keywords(f"{'pigeons' if over_tls else 'pigeon'}://{hostname}", tls)
        keywords["port"] = int(client.port or DEFAULT_PORT)
    if keywords["user"] is None:  # Connection("pigeon://host", userid=..., password=...)
        keywords["user"], keywords["password"] = client.userid, client.password
    check_credentials(keywords["user"], keywords["password"])
    keywords["tls"] = tls_context(keywords["tls"])
    return BrokerAddress(**keywords)


def tls_option(option: Any) -> TlsOption:
    """kombu's ``ssl`` option as the client's ``tls``: a context, True, or None (a dict becomes a context)."""
    if not option:
        return None
    if isinstance(option, ssl.SSLContext) or option is True:
        return option
    if isinstance(option, dict):
        return context_from_dict(option)
    raise InvalidArgumentError(f"the ssl option is an SSLContext, True or a dict, not {option!r}")


def context_from_dict(options: dict[str, Any]) -> ssl.SSLContext:
    """A client context from kombu's dict form: ``ca_certs`` (else the system's CAs), ``certfile`` and
    ``keyfile`` (a client certificate), ``cert_reqs`` (``ssl.CERT_NONE`` checks nothing)."""
    unknown = sorted(set(options) - SSL_KEYS)
    if unknown:
        raise InvalidArgumentError(f"unknown ssl option(s) {unknown}: pigeons:// takes {sorted(SSL_KEYS)}")
    context = ssl.create_default_context(cafile=options.get("ca_certs"))
    if options.get("certfile"):
        context.load_cert_chain(options["certfile"], options.get("keyfile"))
    cert_reqs = options.get("cert_reqs")
    if cert_reqs is not None:
        if cert_reqs == ssl.CERT_NONE:
            context.check_hostname = False  # must go first: a context checking host names needs certificates
        context.verify_mode = ssl.VerifyMode(cert_reqs)
    return context
