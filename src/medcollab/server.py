"""``serve``: run medcollab with uvicorn over HTTPS.

The transport's rules:

* Production refuses to start without TLS (:meth:`~medcollab.config.Settings.check_safe_to_serve`).
* The certificate is the configured one, or a self-signed one generated on first start when none is
  configured; a configured file that is missing is an error, never silently replaced.
* TLS 1.2 is the minimum, and TLS 1.2 only offers ECDHE key exchange with AEAD ciphers
  (:data:`TLS12_CIPHERS`); TLS 1.3's suites are all of that kind already.
* uvicorn sends no ``Server`` header and writes no access log of its own (ours, in
  :mod:`medcollab.api.middleware`, leaves out paths and addresses), and trusts forwarded-address
  headers only from configured proxies.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import uvicorn

from medcollab.app import create_app
from medcollab.config import Settings
from medcollab.crypto.tls import certificate_expiry, certificate_fingerprint, ensure_certificate
from medcollab.errors import ConfigurationError
from medcollab.logging import configure_logging
from medcollab.runtime import Runtime

log = logging.getLogger("medcollab.server")

#: OpenSSL cipher string for TLS 1.2: Mozilla's "intermediate" profile without its finite-field DHE
#: suites. Ephemeral ECDH key exchange only, so a stolen server key does not decrypt recorded
#: traffic (no static RSA key exchange; no DHE, whose group size the client cannot check); AEAD
#: ciphers only (AES-GCM, ChaCha20-Poly1305), so no CBC padding oracles, no RC4 or 3DES, no SHA-1
#: MACs. The exclusions keep anonymous, null, pre-shared-key and SRP suites out even if a future
#: OpenSSL widens the two positive terms. Every TLS 1.2 client of the last decade has one of these.
TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:!PSK:!SRP"
#: A certificate that expires sooner than this is reported at every start.
EXPIRY_WARNING: Final = timedelta(days=30)
SslContextFactory = Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]
_UNSPECIFIED_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})  # noqa: S104  (names, not a bind)


def tls_context(
    cert_file: Path, key_file: Path, *, alpn_protocols: list[str] | None = None
) -> ssl.SSLContext:
    """A server context with medcollab's TLS policy, holding the given certificate and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= (
        # The server's order of suites wins, so a client cannot talk it down to its weakest one.
        ssl.OP_CIPHER_SERVER_PREFERENCE
        # Compression leaks secrets through response sizes (CRIME); it is off by default, kept off.
        | ssl.OP_NO_COMPRESSION
        # Client-initiated renegotiation is a cheap way to make the server do expensive work.
        | ssl.OP_NO_RENEGOTIATION
        # TLS 1.2 session tickets are sealed with one key for the life of the process; whoever
        # steals it can decrypt every recorded session that used a ticket, defeating ECDHE.
        | ssl.OP_NO_TICKET
    )
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(
            f"cannot load the TLS certificate {cert_file} with the key {key_file} "
            f"({type(exc).__name__})",
            hint="check that both are PEM files, readable by this user, and that the key "
            "belongs to the certificate",
        ) from None
    context.set_alpn_protocols(alpn_protocols or ["http/1.1"])
    return context


def prepare_certificate(settings: Settings) -> tuple[Path, Path]:
    """The certificate and key files to serve with, generating a self-signed pair if allowed.

    A pair is generated only when neither file is configured. A configured file that does not exist
    is an error naming it: generating a stand-in would hide a broken deployment behind a
    certificate no client trusts.
    """
    cert_file, key_file = settings.resolved_tls_cert_file, settings.resolved_tls_key_file
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        hostnames, addresses = _certificate_names(settings.host)
        if ensure_certificate(cert_file, key_file, hostnames=hostnames, addresses=addresses):
            log.info(
                "generated a self-signed TLS certificate",
                extra={
                    "certificate": str(cert_file),
                    "fingerprint_sha256": certificate_fingerprint(cert_file),
                },
            )
    else:
        for kind, path in (("certificate", cert_file), ("key", key_file)):
            if not path.is_file():
                variable = (
                    "MEDCOLLAB_TLS_CERT_FILE" if kind == "certificate" else "MEDCOLLAB_TLS_KEY_FILE"
                )
                raise ConfigurationError(
                    f"the TLS {kind} file {path} does not exist",
                    hint=f"set {variable} to an existing PEM file, or unset both "
                    "MEDCOLLAB_TLS_CERT_FILE and MEDCOLLAB_TLS_KEY_FILE to use a generated "
                    "self-signed certificate",
                )
    _report_expiry(
        cert_file, generated=settings.tls_cert_file is None and settings.tls_key_file is None
    )
    if key_file.stat().st_mode & 0o077:
        log.warning(
            "the TLS key file is accessible to other users",
            extra={"key_file": str(key_file), "fix": f"chmod 600 {key_file}"},
        )
    return cert_file, key_file


def build_server(runtime: Runtime) -> uvicorn.Server:
    """A uvicorn server for ``runtime``'s application, configured and loaded but not started."""
    settings = runtime.settings
    settings.check_safe_to_serve()
    ssl_factory: SslContextFactory | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    if settings.tls:
        cert_file, key_file = prepare_certificate(settings)
        ssl_factory = _ssl_context_factory(cert_file, key_file)
    else:
        # check_safe_to_serve() already refused this outside dev and demo mode.
        log.warning("serving plain HTTP: acceptable on a development machine only")

    config = uvicorn.Config(
        create_app(runtime),
        host=settings.host,
        port=settings.port,
        # h11 is the pinned, pure-Python HTTP/1.1 parser; "auto" could pick another one.
        http="h11",
        ssl_certfile=cert_file,
        ssl_keyfile=key_file,
        ssl_context_factory=ssl_factory,
        server_header=False,
        # Our access log middleware logs route templates; uvicorn's would log raw paths, queries
        # and client addresses.
        access_log=False,
        # None keeps uvicorn from installing its own handlers; configure_logging() routes its
        # loggers through the redacting JSON handler.
        log_config=None,
        log_level=settings.log_level.lower(),
        # X-Forwarded-For and friends are set by whoever sends the request; they are trusted only
        # from proxies the operator named.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies) or None,
        ws_max_size=settings.max_body_bytes,
    )
    # Loading now surfaces certificate problems here, as a ConfigurationError, rather than inside
    # the event loop; Server.serve() skips load() for a loaded config.
    config.load()
    return uvicorn.Server(config)


def serve(runtime: Runtime) -> None:
    """Refuse an unsafe deployment, then serve until interrupted."""
    runtime.settings.check_safe_to_serve()
    configure_logging(runtime.settings.log_level)
    build_server(runtime).run()


def _ssl_context_factory(cert_file: Path, key_file: Path) -> SslContextFactory:
    """A uvicorn ``ssl_context_factory`` that ignores uvicorn's defaults for :func:`tls_context`."""

    def factory(config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        # uvicorn has chosen its HTTP protocol by now; offer exactly the ALPN names it speaks.
        alpn = getattr(config.http_protocol_class, "alpn_protocols", None)
        return tls_context(cert_file, key_file, alpn_protocols=alpn)

    return factory


def _certificate_names(host: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Host names and addresses for a generated certificate: loopback plus the configured host."""
    hostnames: list[str] = ["localhost"]
    addresses: list[str] = ["127.0.0.1", "::1"]
    if host not in _UNSPECIFIED_HOSTS:
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            if host.lower() not in hostnames:
                hostnames.append(host.lower())
        else:
            if address not in addresses:
                addresses.append(address)
    return tuple(hostnames), tuple(addresses)


def _report_expiry(cert_file: Path, *, generated: bool) -> None:
    expires = certificate_expiry(cert_file)
    remaining = expires - datetime.now(UTC)
    if remaining > EXPIRY_WARNING:
        return
    fix = (
        f"remove {cert_file} and its key to have a new one generated"
        if generated
        else f"renew the certificate in {cert_file}"
    )
    log.warning(
        "the TLS certificate has expired"
        if remaining.total_seconds() <= 0
        else "the TLS certificate expires soon",
        extra={"certificate": str(cert_file), "not_after": expires.isoformat(), "fix": fix},
    )
