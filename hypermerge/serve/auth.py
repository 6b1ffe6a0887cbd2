"""API keys: ``Authorization: Bearer KEY`` on every ``/v1/*`` route, as the OpenAI API, vLLM and TEI
take them (the ``openai`` SDK sends exactly that header for its ``api_key``).

Keys come from ``--api-key`` (repeatable), ``HYPERMERGE_API_KEY`` (comma-separated) and
``--api-key-file`` (one key per line, ``#`` comments; what secrets managers mount), all of them
valid at once, so a key can be rotated without downtime. A missing or wrong key gets ``401`` in
OpenAI's error shape, which says nothing about the valid keys. Keys are compared through their
SHA-256 digests with :func:`hmac.compare_digest`, against every key: the time taken depends neither
on how much of a key matched nor on which key it was. ``/health`` stays open (load balancers probe
it); ``/metrics`` needs a key too unless ``--open-metrics``. No key is ever logged, echoed in an
error or put in a metric label.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from hypermerge.errors import ConfigError

API_KEY_ENV = "HYPERMERGE_API_KEY"
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def key_problems(keys: Sequence[str]) -> list[str]:
    """What is wrong with ``keys``, one line each, never quoting a key (they are secrets)."""
    problems = []
    for i, key in enumerate(keys, 1):
        if not key:
            problems.append(f"API key #{i} is empty")
        elif not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
            problems.append(f"API key #{i} has spaces or characters an HTTP header cannot carry "
                            "(use printable ASCII without spaces)")
    return problems


def collect_api_keys(keys: Iterable[str] = (), env_value: str | None = None,
                     files: Iterable[str | Path] = ()) -> tuple[str, ...]:
    """Every key from the options, the environment variable and the key files, deduplicated.

    Args:
        keys: ``--api-key`` values.
        env_value: ``HYPERMERGE_API_KEY``'s value (comma-separated keys; None or blank: none).
        files: ``--api-key-file`` paths: one key per line; blank lines and ``#`` comments skipped.

    Raises:
        ConfigError: a key file is missing, unreadable or holds no key (the message names the file
            and never quotes a key); the environment variable holds only commas.
    """
    found = list(keys)
    if env_value and env_value.strip():
        from_env = [part.strip() for part in env_value.split(",") if part.strip()]
        if not from_env:  # set to something, yet no key: a broken secret, not "no auth wanted"
            raise ConfigError(f"{API_KEY_ENV} is set but holds no key", hint="give comma-separated keys, or unset it")
        found += from_env
    for file in files:
        path = Path(file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise ConfigError(f"cannot read the --api-key-file ({reason})", path=path,
                              hint="give a readable file with one key per line") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ConfigError("the --api-key-file holds no key", path=path,
                              hint="write one key per line (lines starting with # are comments)")
        found += from_file
    return tuple(dict.fromkeys(found))  # first occurrence order, no duplicates


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves beyond this machine


def exposure_warning(host: str, keys: Sequence[str]) -> str | None:
    """The start-up warning for a server reachable from the network without a key (None: no warning)."""
    if keys or is_loopback(host):
        return None
    return (f"hypermerge: warning: serving on {host} without an API key: anyone who can reach this port can use "
            "the model (pass --api-key, --api-key-file or HYPERMERGE_API_KEY)")


class KeyChecker:
    """Whether a presented key is one of the valid ones, in constant time."""

    def __init__(self, keys: Sequence[str]):
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def valid(self, presented: bytes) -> bool:
        digest = hashlib.sha256(presented).digest()
        matched = False
        for known in self._digests:  # every key, no early exit: timing says nothing about which matched
            matched |= hmac.compare_digest(digest, known)
        return matched


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (scheme case-insensitive), or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class ApiKeyMiddleware:
    """401 for a ``/v1/*`` request (and ``/metrics`` unless ``open_metrics``) without a valid key.

    Pure ASGI, in front of the body-size and queue gate: an unauthenticated request is refused
    before its body is read and never takes a place in the queue.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str], open_metrics: bool = False):
        self.app, self.checker, self.open_metrics = app, KeyChecker(keys), open_metrics

    def protects(self, path: str) -> bool:
        return path.startswith("/v1/") or path == "/v1" or (path == "/metrics" and not self.open_metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.checker or not self.protects(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope["headers"])
        if token is not None and self.checker.valid(token):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided." if token is not None else
                   "Missing API key: send it as the header 'Authorization: Bearer YOUR_KEY'.")
        response = JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                           "code": "invalid_api_key"}}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
