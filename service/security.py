"""TLS contexts and API tokens: what protects vblk's listeners.

Service layer, used by :mod:`service.app` for the NBD (STARTTLS) and HTTP (HTTPS) listeners
and by the REST middleware for bearer tokens. The threats and what answers each are listed in
``docs/security.md``.
"""

from __future__ import annotations

import dataclasses
import hmac
import ssl
from pathlib import Path
from typing import Literal

Access = Literal["admin", "rw", "ro"]


class SecurityConfigError(ValueError):
    """A certificate, key or token file cannot be used; the message says which and why."""


def server_context(
    cert: Path, key: Path, ca: Path | None = None, verify_client: bool = False
) -> ssl.SSLContext:
    """A TLS 1.2+ server context with ``cert``/``key``; with ``verify_client``, clients need a
    certificate signed by ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from exc
    if verify_client:
        if ca is None:
            raise SecurityConfigError(
                "tls-verify-client needs tls-ca (the CA that signs client certificates)"
            )
        try:
            context.load_verify_locations(str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise SecurityConfigError(f"cannot load TLS CA {ca}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclasses.dataclass(frozen=True, slots=True)
class Tokens:
    """Bearer tokens, each of a class: ``admin`` (read-write and the control plane: disks added,
    removed, resized, throttled), ``rw`` (read-write data) or ``ro`` (read-only data)."""

    tokens: tuple[tuple[str, Access], ...]

    @classmethod
    def load(cls, path: Path) -> Tokens:
        """One token per line: ``admin TOKEN``, ``rw TOKEN`` or ``ro TOKEN``; ``#`` starts a comment."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise SecurityConfigError(f"cannot read tokens file {path}: {exc.strerror}") from exc
        tokens: list[tuple[str, Access]] = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] not in ("admin", "rw", "ro") or len(parts[1]) < 16:
                raise SecurityConfigError(
                    f"{path}:{number}: want 'admin TOKEN', 'rw TOKEN' or 'ro TOKEN' "
                    "with a token of 16+ characters"
                )
            access: Access = "admin" if parts[0] == "admin" else "rw" if parts[0] == "rw" else "ro"
            tokens.append((parts[1], access))
        if not tokens:
            raise SecurityConfigError(f"{path}: no tokens")
        return cls(tuple(tokens))

    def access(self, authorization: str | None) -> Access | None:
        """The access an ``Authorization`` header grants (compared in constant time), or None."""
        if authorization is None:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        granted: Access | None = None
        for token, access in self.tokens:
            if hmac.compare_digest(token.encode(), presented.strip().encode()):
                granted = access
        return granted
