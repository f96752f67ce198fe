"""Bearer tokens with scopes, checked by Connexion before any view runs.

Connexion's own bearer handler ignores the scopes a security requirement lists, so the spec's
``bearer`` scheme gets this handler (``security_map``): no token or an unknown one is a 401, a
token without the operation's scope a 403, both problem+json with an RFC 6750 challenge.
"""
from __future__ import annotations

import functools

from connexion import context
from connexion.exceptions import ProblemException
from connexion.security import AbstractSecurityHandler

from embedding_rollout.auth import Caller, VerifierUnavailable

REALM = "embedding-rollout"


def _refused(status: int, title: str, detail: str, error: str | None, scopes=()) -> ProblemException:
    challenge = f'Bearer realm="{REALM}"'
    if error:
        challenge += f', error="{error}"'
    if scopes:
        challenge += f', scope="{" ".join(scopes)}"'
    return ProblemException(status=status, title=title, detail=detail, headers={"WWW-Authenticate": challenge})


class ScopedBearerHandler(AbstractSecurityHandler):
    def __init__(self, verifier):
        self.verifier = verifier

    def get_fn(self, security_scheme, required_scopes):
        required = tuple(required_scopes or ())

        def check(request):
            authorization = request.headers.get("Authorization", "")
            kind, _, token = authorization.partition(" ")
            if kind.lower() != "bearer" or not token.strip():
                raise _refused(401, "Unauthorized", "this operation needs a bearer token"
                               + (f" with scope {' '.join(required)}" if required else ""), None, required)
            try:
                caller = self.verifier.verify(token.strip())
            except VerifierUnavailable as exc:
                raise ProblemException(status=503, title="Service Unavailable", detail=str(exc),
                                       headers={"Retry-After": "5"}) from exc
            if caller is None:
                raise _refused(401, "Unauthorized", "the bearer token is unknown, expired or malformed",
                               "invalid_token")
            missing = [s for s in required if s not in caller.scopes]
            if missing:
                raise _refused(403, "Forbidden", f"caller {caller.name} lacks scope {' '.join(missing)}",
                               "insufficient_scope", required)
            return {"sub": caller.name, "scope": sorted(caller.scopes)}

        return check


def security_map(verifier) -> dict:
    return {"bearer": functools.partial(ScopedBearerHandler, verifier)}


def caller() -> Caller | None:
    """The caller of the current request, when the operation asked for a token."""
    info = context.context.get("token_info") if hasattr(context, "context") else None
    if not info:
        return None
    return Caller(info["sub"], frozenset(info.get("scope", ())))
