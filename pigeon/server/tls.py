"""TLS on the client port: the server's ``ssl.SSLContext``, a cluster node's context for its
connections to the other nodes, and who a client certificate names.

The event loop (uvloop or asyncio) runs the handshake and the record layer
through the standard library's ``ssl`` module; the broker's protocol sees
plain bytes as before. A connection reaches the core only once its handshake
is done, so a plain-text client or a stalled handshake never occupies a
core connection.
"""

from __future__ import annotations

import asyncio
import ssl

# seconds a client has to complete its handshake before the socket is closed
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM, with its chain) and ``key``: TLS 1.2 or later, the
    library's modern defaults; with ``ca`` (PEM bundle) every client must present a certificate
    it signed (mutual TLS).

    Raises OSError or ssl.SSLError when a file cannot be read or the key does not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def node_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """The client context a cluster node connects to the other nodes with (they speak TLS on their
    ports as it does): TLS 1.2 or later, each peer's certificate checked against ``ca`` (PEM
    bundle; the system's trusted CAs without one) and against the address the peer advertises, and
    this node's own ``cert`` and ``key`` presented, for peers that require client certificates.

    Raises OSError or ssl.SSLError when a file cannot be read or the key does not match.
    """
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def certificate_user(transport: asyncio.BaseTransport) -> str | None:
    """The common name (CN) of the subject of the certificate the peer presented, if any.

    Only a verified certificate is seen (mutual TLS, ``--tls-ca``): without
    one, on a plain connection, and for a subject with no CN or with more than
    one (which would be ambiguous), this is None.
    """
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    names = [str(value) for rdn in cert.get("subject", ()) for name, value in rdn if name == "commonName"]
    return names[0] if len(names) == 1 else None
