"""Who may call what: bearer tokens, their scopes, and where they are kept.

Two kinds of token, one interface (``verify(token) -> Caller | None``):

- **Static tokens** in a file (``ER_TOKENS``, default ``$ER_HOME/tokens.json``, mode 0600), the
  local default and Compose's. ``embedding-rollout up`` creates it on first start. The app keeps
  only SHA-256 digests and compares them in constant time; it re-reads the file when it changes,
  so a new or revoked token takes effect without a restart.
- **JWTs** (the cluster): checked with pyjwt against the issuer's JWKS (asymmetric algorithms only;
  ``exp``, ``iss``, ``aud`` and ``sub`` required). Scopes come from the ``scope``/``scp`` claim or,
  for identities whose tokens carry none (Kubernetes ServiceAccount tokens), from
  ``ER_JWT_SUBJECT_SCOPES``.

No token is ever logged: only callers' names are.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import jwt

log = logging.getLogger(__name__)

SEARCH, DOCUMENTS_WRITE, FEEDBACK_WRITE, ROLLOUT_OPERATE = "search", "documents:write", "feedback:write", "rollout:operate"
SCOPES = (SEARCH, DOCUMENTS_WRITE, FEEDBACK_WRITE, ROLLOUT_OPERATE)
# The callers `up` creates: one per kind, each with only its own scope.
DEFAULT_CALLERS = {"operator": (ROLLOUT_OPERATE,), "writer": (DOCUMENTS_WRITE,),
                   "feedback": (FEEDBACK_WRITE,), "search": (SEARCH,)}


class InvalidTokenFile(ValueError):
    pass


class VerifierUnavailable(RuntimeError):
    """The token could not be checked now (the JWKS could not be fetched): not the caller's fault."""


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[str]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _parse_scopes(value) -> frozenset[str]:
    scopes = value.split() if isinstance(value, str) else list(value or [])
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise InvalidTokenFile(f"unknown scopes {unknown}; known: {list(SCOPES)}")
    return frozenset(scopes)


class StaticTokens:
    """Callers by the digest of their token."""

    def __init__(self, callers: dict[str, tuple[str, frozenset[str]]]):  # name -> (token, scopes)
        self._by_digest = [(_digest(token), Caller(name, scopes)) for name, (token, scopes) in callers.items()]

    def verify(self, token: str) -> Caller | None:
        presented, found = _digest(token), None
        for digest, caller in self._by_digest:  # every entry compared: the time says nothing of which
            if hmac.compare_digest(presented, digest):
                found = caller
        return found


def read_token_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidTokenFile(f"{path}: {exc}") from exc
    callers = data.get("callers") if isinstance(data, dict) else None
    if not isinstance(callers, dict):
        raise InvalidTokenFile(f"{path}: expected an object with 'callers'")
    for name, entry in callers.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("token"), str) and len(entry["token"]) >= 16):
            raise InvalidTokenFile(f"{path}: caller {name!r} needs a 'token' of at least 16 characters")
        _parse_scopes(entry.get("scopes"))
    return data


class FileTokens:
    """``StaticTokens`` from a token file, re-read when the file changes. A broken edit is logged
    and the last good tokens stay in force, so a typo cannot lock every caller out."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock, self._stamp, self._tokens = threading.Lock(), None, StaticTokens({})
        self._reload()

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except OSError:
            stamp = None
        else:
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        with self._lock:
            self._stamp = stamp
            if stamp is None:
                self._tokens = StaticTokens({})
                return
            try:
                callers = read_token_file(self.path)["callers"]
            except InvalidTokenFile as exc:
                log.error("token file not reloaded, the previous tokens stay in force: %s", exc)
                return
            self._tokens = StaticTokens({name: (e["token"], _parse_scopes(e.get("scopes")))
                                         for name, e in callers.items()})

    def verify(self, token: str) -> Caller | None:
        self._reload()
        return self._tokens.verify(token)


def parse_subject_scopes(text: str) -> dict[str, frozenset[str]]:
    """``ER_JWT_SUBJECT_SCOPES``: ``subject=scope scope;subject=scope``."""
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        subject, sep, scopes = part.partition("=")
        if not sep or not subject.strip():
            raise ValueError(f"ER_JWT_SUBJECT_SCOPES: expected 'subject=scope ...', got {part!r}")
        mapping[subject.strip()] = _parse_scopes(scopes)
    return mapping


class JwksClient(jwt.PyJWKClient):
    """pyjwt's JWKS client, presenting the token in ``token_file`` when it fetches: the API
    server's JWKS needs a caller too, the pod's own token, which the kubelet rotates (read at
    every fetch)."""

    def __init__(self, uri: str, token_file: str | None, **kwargs):
        super().__init__(uri, **kwargs)
        self.token_file = token_file

    def fetch_data(self):
        if self.token_file:
            self.headers = {**(self.headers or {}), "Authorization": f"Bearer {Path(self.token_file).read_text().strip()}"}
        return super().fetch_data()


class JwtTokens:
    """JWTs signed by the issuer's keys (JWKS at ``jwks_url``, fetched and cached by pyjwt)."""

    ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]  # never HS*: no shared secret

    def __init__(self, issuer: str, jwks_url: str, audience: str, subject_scopes: dict[str, frozenset[str]] | None = None,
                 ca_file: str | None = None, token_file: str | None = None):
        self.issuer, self.audience, self.subject_scopes = issuer, audience, subject_scopes or {}
        context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._keys = JwksClient(jwks_url, token_file, cache_keys=True, lifespan=300, ssl_context=context)

    def verify(self, token: str) -> Caller | None:
        try:
            key = self._keys.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise VerifierUnavailable(f"the issuer's keys could not be fetched: {exc}") from exc
        except jwt.PyJWTError:
            return None
        try:
            claims = jwt.decode(token, key.key, algorithms=self.ALGORITHMS, audience=self.audience, issuer=self.issuer,
                                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.PyJWTError:
            return None
        granted = claims.get("scope", claims.get("scp", ""))
        listed = granted.split() if isinstance(granted, str) else granted if isinstance(granted, list) else []
        scopes = frozenset(s for s in listed if s in SCOPES)  # an issuer's other scopes mean nothing here
        return Caller(claims["sub"], scopes | self.subject_scopes.get(claims["sub"], frozenset()))


class Verifiers:
    """The first verifier that knows the token decides."""

    def __init__(self, *verifiers):
        self.verifiers = [v for v in verifiers if v is not None]

    def verify(self, token: str) -> Caller | None:
        for verifier in self.verifiers:
            caller = verifier.verify(token)
            if caller is not None:
                return caller
        return None


def verifier_from_settings(settings) -> Verifiers:
    jwt = None
    if settings.jwt_jwks_url:
        jwt = JwtTokens(settings.jwt_issuer, settings.jwt_jwks_url, settings.jwt_audience,
                        parse_subject_scopes(settings.jwt_subject_scopes), settings.jwt_ca_file or None,
                        settings.jwt_jwks_token_file or None)
    return Verifiers(FileTokens(settings.tokens_path), jwt)


# -- the token file --------------------------------------------------------------------------------
def _new_token() -> str:
    return secrets.token_urlsafe(32)


def _write_private(path: Path, data: dict) -> None:
    """Write ``data`` readable by its owner only, replacing the file in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=2)
    os.replace(temporary, path)


def ensure_tokens_file(path: Path) -> bool:
    """Create the token file with one token per default caller and a feedback signing key, unless
    it exists (it is never overwritten). True when it was created."""
    path = Path(path)
    if path.exists():
        read_token_file(path)  # a broken file is said now, not at the first refused call
        return False
    _write_private(path, {"callers": {name: {"token": _new_token(), "scopes": list(scopes)}
                                      for name, scopes in DEFAULT_CALLERS.items()},
                          "feedback_key": _new_token()})
    return True


def add_token(path: Path, name: str, scopes) -> str:
    """Create or replace ``name``'s token (the old one stops working at the app's next call)."""
    path = Path(path)
    data = read_token_file(path) if path.exists() else {"callers": {}, "feedback_key": _new_token()}
    token = _new_token()
    data["callers"][name] = {"token": token, "scopes": sorted(_parse_scopes(list(scopes)))}
    _write_private(path, data)
    return token


def token_for(path: Path, name: str) -> str:
    callers = read_token_file(Path(path))["callers"]
    if name not in callers:
        raise InvalidTokenFile(f"{path}: no caller {name!r} (callers: {', '.join(sorted(callers))})")
    return callers[name]["token"]


def feedback_key(settings) -> bytes:
    """The key that signs search answers' feedback references: ``ER_FEEDBACK_KEY`` (a Secret in
    the cluster, shared by every app pod), else the token file's."""
    if settings.feedback_key:
        return settings.feedback_key.encode()
    path = Path(settings.tokens_path)
    if path.exists():
        key = read_token_file(path).get("feedback_key")
        if isinstance(key, str) and len(key) >= 16:
            return key.encode()
    raise InvalidTokenFile(f"no feedback signing key: set ER_FEEDBACK_KEY or create {path} "
                           "(embedding-rollout tokens init)")
