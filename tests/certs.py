"""Certificates made on the fly (``trustme``) for the TLS tests: a CA, the server's, clients'."""

from __future__ import annotations

import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

import trustme

SERVER_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate it signed for SERVER_NAMES, a client certificate it
    signed for the user "alice", and a client certificate of "mallory" signed by another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client: Path  # certificate and key in one file, as ssl's load_cert_chain takes them
    stranger: Path
    stranger_ca: Path

    def server_flags(self, mutual: bool = False) -> list[str]:
        """The ``pigeon`` flags that turn on TLS (and mutual TLS) with these files."""
        flags = ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]
        return [*flags, "--tls-ca", str(self.ca)] if mutual else flags

    def client_context(self, cert: Path | None = None) -> ssl.SSLContext:
        """A client context that trusts the CA, presenting ``cert`` (certificate and key) if given."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(str(cert))
        return context


def make_certs(directory: Path) -> Certs:
    """Write a fresh set of certificates into ``directory``."""
    ca = trustme.CA()
    other_ca = trustme.CA()
    paths = Certs(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client=directory / "alice.pem",
        stranger=directory / "mallory.pem",
        stranger_ca=directory / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    other_ca.cert_pem.write_to_path(str(paths.stranger_ca))
    server = ca.issue_cert(*SERVER_NAMES)
    server.private_key_pem.write_to_path(str(paths.server_key))
    server.cert_chain_pems[0].write_to_path(str(paths.server_cert))
    ca.issue_cert("alice.example.org", common_name="alice").private_key_and_cert_chain_pem.write_to_path(
        str(paths.client)
    )
    stranger = other_ca.issue_cert("mallory.example.org", common_name="mallory")
    stranger.private_key_and_cert_chain_pem.write_to_path(str(paths.stranger))
    return paths


def old_tls_context(certs: Certs) -> ssl.SSLContext:
    """A client context that offers TLS 1.1 only (with the security level that still allows it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(certs.ca))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context
