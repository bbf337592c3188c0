"""API keys: where they come from and how a request's bearer token is checked.

Keys come from `server.api_key_file` (one per line, # comments) and/or the environment
variable MLX_CLUSTER_API_KEY (comma-separated). They never appear on a command line or in a log.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from mlx_cluster.server.protocol import APIError

ENV_VAR = "MLX_CLUSTER_API_KEY"


def load_api_keys(api_key_file: str | None, environ=os.environ) -> tuple[str, ...]:
    keys: list[str] = []
    if api_key_file:
        path = Path(api_key_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"server.api_key_file: cannot read {path}: {e.strerror}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise ValueError(f"server.api_key_file: {path} holds no key")
    keys += [k.strip() for k in environ.get(ENV_VAR, "").split(",") if k.strip()]
    return tuple(keys)


def check_auth(header: str | None, keys: tuple[str, ...], api_key: str | None = None) -> APIError | None:
    """None when allowed. The key comes as `Authorization: Bearer <key>` (OpenAI clients) or as
    `x-api-key: <key>` (Anthropic clients). Every key is compared in constant time."""
    if not keys:
        return None
    token = ""
    if header and header[:7].lower() == "bearer ":
        token = header[7:].strip()
    elif api_key:
        token = api_key.strip()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token.encode(), key.encode())
    if ok:
        return None
    message = (
        "missing API key: send Authorization: Bearer <key> or x-api-key: <key>" if not token else "invalid API key"
    )
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
