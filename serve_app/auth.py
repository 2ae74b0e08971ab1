"""Optional bearer-token auth for the inference endpoints.

The token comes from an environment variable of the ingress replica (`ingress.auth_token_env`,
default PIPELINE_API_TOKEN): set it (e.g. `PIPELINE_API_TOKEN=... serve run serve_config.yaml`)
and every /v1 request must carry `Authorization: Bearer <token>`; leave it unset and the API is
open (it binds to 127.0.0.1 by default). Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import logging
import os

from serve_app.decoding import InputError

logger = logging.getLogger("ray.serve")


class BearerAuth:
    def __init__(self, env_var: str | None) -> None:
        token = os.environ.get(env_var, "") if env_var else ""
        self._token = token.encode() if token else None
        if self._token is None:
            logger.info("bearer auth off (%s is not set)", env_var)
        else:
            logger.info("bearer auth on (token from %s)", env_var)

    def check(self, authorization: str | None) -> None:
        """Raise a 401 InputError unless `authorization` is `Bearer <the token>`."""
        if self._token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise InputError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")
