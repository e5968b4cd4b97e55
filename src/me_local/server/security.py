"""Who may talk to the daemon.

A local daemon is reachable from every web page the user opens, so besides the
optional API key it checks:

* ``Host``: only loopback names and addresses, the address it was bound to and
  ``--allow-host`` names. A DNS-rebinding page reaches 127.0.0.1 under its own
  name (``Host: evil.example``) and is turned away.
* ``Origin``: a browser names the page that sent a cross-origin request; it is
  refused unless listed with ``--allow-origin``. Clients that are not browsers
  (SDKs, editors, curl) send no ``Origin``. CORS headers go out only to allowed origins.
* the body size (aiohttp's ``client_max_size``, checked early from ``Content-Length``).

The checks are pure functions; :func:`security_middleware` applies them.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..errors import UsageError
from .errors import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC_PATHS = frozenset({"/health"})
CORS_ALLOW_HEADERS = "Authorization, Content-Type"
CORS_ALLOW_METHODS = "GET, POST, HEAD, OPTIONS"


@dataclass(frozen=True)
class AccessPolicy:
    api_key: str | None = None
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    """Extra Host names (lower case); ``*`` accepts any."""
    allow_origins: frozenset[str] = field(default_factory=frozenset)
    """Allowed browser origins (``scheme://host[:port]``); ``*`` accepts any."""
    bind_host: str = "127.0.0.1"
    max_body_bytes: int = 8 << 20


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without an API key (unless --insecure)."""
    if not is_loopback(host) and not api_key and not insecure:
        raise UsageError(
            f"refusing to listen on {host!r} (reachable from other machines) without an API key; "
            "set --api-key or ME_LOCAL_API_KEY, or pass --insecure to allow it anyway"
        )


def host_name(header: str) -> str | None:
    """The host part of a Host header (lower case, no port, IPv6 without brackets)."""
    try:
        name = urlsplit("//" + header.strip()).hostname
    except ValueError:
        return None
    return name or None


def host_allowed(header: str | None, policy: AccessPolicy) -> bool:
    if not header:
        return False
    name = host_name(header)
    if name is None:
        return False
    if "*" in policy.allow_hosts or name in policy.allow_hosts or is_loopback(name):
        return True
    bind = policy.bind_host.strip("[]").lower()
    if name == bind:
        return True
    # bound to every interface: any address literal reaches us legitimately (it cannot be rebound)
    return is_wildcard(bind) and is_ip(name)


def normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def origin_allowed(origin: str, policy: AccessPolicy) -> bool:
    return "*" in policy.allow_origins or normalize_origin(origin) in policy.allow_origins


def key_matches(header: str | None, api_key: str) -> bool:
    """``Authorization: Bearer KEY``, compared in constant time."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), api_key.encode("utf-8"))


def make_policy(
    *,
    api_key: str | None,
    allow_hosts: Iterable[str] = (),
    allow_origins: Iterable[str] = (),
    bind_host: str = "127.0.0.1",
    max_body_bytes: int = 8 << 20,
) -> AccessPolicy:
    return AccessPolicy(
        api_key=api_key or None,
        allow_hosts=frozenset(h.strip().lower() for h in allow_hosts if h.strip()),
        allow_origins=frozenset(normalize_origin(o) for o in allow_origins if o.strip()),
        bind_host=bind_host,
        max_body_bytes=max_body_bytes,
    )


def cors_headers(origin: str) -> dict[str, str]:
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
        "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }


def security_middleware(policy: AccessPolicy) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not host_allowed(request.headers.get("Host"), policy):
            raise ApiError(
                403,
                f"Host {request.headers.get('Host', '')!r} is not allowed; me-local answers loopback names and "
                "addresses (add a name with --allow-host)",
                code="host_not_allowed",
            )
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, policy):
            raise ApiError(
                403,
                f"cross-origin requests from {origin!r} are not allowed (allow it with --allow-origin)",
                code="origin_not_allowed",
            )
        if request.method == "OPTIONS" and origin is not None:
            return web.Response(status=204, headers=cors_headers(origin))
        if (policy.api_key and request.path not in PUBLIC_PATHS
                and not key_matches(request.headers.get("Authorization"), policy.api_key)):
            raise ApiError(
                401,
                "missing or wrong API key; send `Authorization: Bearer KEY`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = request.content_length
        if length is not None and length > policy.max_body_bytes:
            raise ApiError(
                413,
                f"the request body is {length} bytes; the limit is {policy.max_body_bytes}",
                code="request_too_large",
            )
        return await handler(request)

    return check


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CORS headers for origins the middleware let through."""
    origin = request.headers.get("Origin")
    if origin is not None and response.status != 403 and "Access-Control-Allow-Origin" not in response.headers:
        response.headers.update(cors_headers(origin))
