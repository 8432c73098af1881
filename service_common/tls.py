"""TLS for the services and their clients.

Servers: `server_credentials` serves a certificate and key from files and, with a client CA,
requires and verifies client certificates (mutual TLS). gRPC asks for the configuration at
every handshake; the files are re-read when their size or mtime changed, so a rotated
certificate (cert-manager, a Secret update) is served without a restart. A half-written
rotation (a key that does not match its certificate, an unreadable file) keeps the previous
configuration and is logged; the next handshake tries again.

Clients (the CLI, the sender's channel to its receiver) use `qkvcomm_client.ClientTLS` and
`open_channel`, the light client's, so there is one definition of how a channel is opened.
"""
from __future__ import annotations

import logging
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)


class _ReloadingFiles:
    """The server's certificate configuration, read again whenever its files change."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None):
        self.paths = [p for p in (cert, key, client_ca) if p is not None]
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._stat()
        self.initial = self._configuration()

    def _stat(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.st_mtime_ns, s.st_size) for s in (p.stat() for p in self.paths))

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self.cert.read_bytes(), self.key.read_bytes()
        _check_pair(cert, key, self.cert)
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake callback: a new configuration when the files changed, else None (keep)."""
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            config = self._configuration()
        except (OSError, ValueError) as e:
            log.warning("TLS files changed but cannot be used yet (%s); serving the previous certificate", e)
            return None
        self._stamp = stamp
        log.info("TLS certificate reloaded from %s", self.cert)
        return config


def _check_pair(cert_pem: bytes, key_pem: bytes, where: Path) -> None:
    """ValueError unless the key belongs to the certificate (a rotation caught halfway)."""
    public = x509.load_pem_x509_certificate(cert_pem).public_key()
    private = serialization.load_pem_private_key(key_pem, password=None)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if public.public_bytes(*raw) != private.public_key().public_bytes(*raw):
        raise ValueError(f"the key does not match the certificate {where}")


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS server credentials from files (reloaded when they change); mutual TLS with `client_ca`."""
    if not cert or not key:
        raise ValueError("TLS needs both --tls-cert and --tls-key (QKVCOMM_TLS_CERT, QKVCOMM_TLS_KEY)")
    files = _ReloadingFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch,
                                               require_client_authentication=client_ca != "")
