"""Development certificates: a CA, a server certificate and a client certificate, made with
`cryptography` (what `qkvcomm certs dev DIR` writes and the tests use).

Files, PEM: ca.crt, ca.key, server.crt, server.key, client.crt, client.key. Keys are ECDSA P-256,
written 0600. The server certificate names every host given (DNS names and IP addresses) and
is valid for server auth; the client certificate's common name is the client's name and is valid
for client auth. For development and tests; a deployment takes its certificates from its own CA
(cert-manager in deploy/k8s/overlays/tls).
"""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qkv_core.atomic import write_atomic
from service_common.auth import format_tokens

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", "receiver", "sender")  # the compose service names too


@dataclass(frozen=True)
class DevCerts:
    """Paths of one set of development certificates."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def cert(self, who: str) -> Path:  # who: server or client
        return self.directory / f"{who}.crt"

    def key(self, who: str) -> Path:
        return self.directory / f"{who}.key"

    def write_tokens(self, tokens: dict[str, str]) -> Path:
        """DIR/tokens, a token file (service_common.auth) of {tenant: token}, owner-readable only."""
        path = self.directory / "tokens"
        write_atomic(path, format_tokens(tokens).encode(), private=True)
        return path


def make_dev_certs(directory: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, client: str = "qkvcomm-client",
                   days: int = 365, ca_name: str = "qkvcomm dev CA") -> DevCerts:
    """Write a new CA and a server and client certificate signed by it into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = _name(ca_name)
    ca = (
        _builder(ca_subject, ca_subject, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write_atomic(directory / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    write_atomic(directory / "ca.key", _key_pem(ca_key), private=True)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    for stem, common_name, usage, extra in (
        ("server", hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, [x509.SubjectAlternativeName(sans)]),
        ("client", client, ExtendedKeyUsageOID.CLIENT_AUTH, []),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (_builder(_name(common_name), ca_subject, key.public_key(), now, days)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        for extension in extra:
            builder = builder.add_extension(extension, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write_atomic(directory / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM))
        write_atomic(directory / f"{stem}.key", _key_pem(key), private=True)
    return DevCerts(directory)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime.datetime,
             days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days)))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
