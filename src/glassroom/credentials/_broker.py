"""The built-in broker: per-task tokens that are signed, scoped and short-lived.

Tokens are Ed25519-signed (so a service can verify them with the public key
alone, offline) and carry the sandbox id, the credential name, the scope and
an expiry no later than the sandbox's max runtime.  Revocation is a list of
token ids in the state dir, so ``verify`` in any process on the host sees a
token revoked at destroy.  Format: ``glsr1.<payload b64url>.<signature b64url>``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .. import _config
from .._errors import CredentialError

PREFIX = "glsr1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Claims:
    jti: str
    sandbox: str
    name: str
    scope: tuple[str, ...]
    iat: float
    exp: float


class Broker:
    """Mint, verify and revoke broker tokens.  The key lives in ``<state>/broker``."""

    def __init__(self, state: Path | None = None) -> None:
        self.dir = (state or _config.state_dir()) / "broker"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._key = self._load_key()

    def _load_key(self) -> Ed25519PrivateKey:
        path = self.dir / "ed25519.key"
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            tmp = path.with_suffix(f".{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            try:
                os.link(tmp, path)  # first writer wins; others load its key
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise CredentialError(f"broker: {path} is not an Ed25519 key")
        return loaded

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def public_key_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def mint(self, sandbox: str, name: str, scope: list[str], ttl_s: float) -> tuple[str, Claims]:
        now = time.time()
        claims = Claims(secrets.token_hex(12), sandbox, name, tuple(scope), now, now + ttl_s)
        payload = json.dumps(claims.__dict__, sort_keys=True, separators=(",", ":")).encode()
        sig = self._key.sign(payload)
        return f"{PREFIX}.{_b64(payload)}.{_b64(sig)}", claims

    def verify(self, token: str, *, scope: str | None = None) -> Claims:
        """The token's claims, or CredentialError saying why it is not valid now."""
        try:
            prefix, body, sig = token.strip().split(".")
            if prefix != PREFIX:
                raise ValueError
            payload = _unb64(body)
            self.public_key.verify(_unb64(sig), payload)
            raw: dict[str, Any] = json.loads(payload)
            claims = Claims(**{**raw, "scope": tuple(raw["scope"])})
        except InvalidSignature:
            raise CredentialError("broker token: bad signature") from None
        except (ValueError, TypeError, KeyError):
            raise CredentialError("broker token: malformed") from None
        if time.time() >= claims.exp:
            raise CredentialError(f"broker token {claims.jti}: expired")
        if self.revoked(claims.jti):
            raise CredentialError(f"broker token {claims.jti}: revoked")
        if scope is not None and scope not in claims.scope:
            raise CredentialError(f"broker token {claims.jti}: scope {scope!r} not granted")
        return claims

    def revoke(self, jti: str) -> None:
        with (self.dir / "revoked").open("a") as f:
            f.write(jti + "\n")
            f.flush()
            os.fsync(f.fileno())

    def revoked(self, jti: str) -> bool:
        try:
            with (self.dir / "revoked").open() as f:
                return any(line.strip() == jti for line in f)
        except FileNotFoundError:
            return False
