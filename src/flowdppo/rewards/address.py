"""A reward server's address: ``http[s]://HOST:PORT[/path][?batch_size=N&timeout=S&token=T]``, and the proxy
the environment puts before it."""

from __future__ import annotations

import ipaddress
import re
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from flowdppo.errors import ConfigError
from flowdppo.rewards.wire import check_token

DEFAULT_BATCH_SIZE = 32
DEFAULT_TIMEOUT_S = 120.0
OPTIONS = ("batch_size", "timeout", "token")
_HOST = re.compile(r"^[A-Za-z0-9._\-:%]+$")


@dataclass(frozen=True)
class RemoteSpec:
    """Where the server is (``url`` without the query) and how to call it."""

    url: str
    batch_size: int = DEFAULT_BATCH_SIZE
    timeout: float = DEFAULT_TIMEOUT_S
    token: str | None = field(default=None, repr=False)


def is_remote(name: str) -> bool:
    """Whether a reward name is a server's address (``http://`` or ``https://``)."""
    return name.strip().lower().startswith(("http://", "https://"))


def redacted(name: str) -> str:
    """``name`` with the value of a ``token=`` option hidden, for messages."""
    return re.sub(r"(?i)(\btoken=)[^&#]*", r"\1***", name)


def parse_remote(name: str) -> RemoteSpec:
    """``http[s]://HOST:PORT[/path][?batch_size=N&timeout=S&token=T]`` -> ``RemoteSpec``; else a ConfigError."""
    shown = redacted(name)
    bad = f"reward.names: {shown!r} is not a reward server address (http://HOST:PORT"
    parts = urlsplit(name.strip())
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number in 0..65535)
    except ValueError as err:
        raise ConfigError(f"{bad}; {err})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or not _HOST.match(parts.hostname):
        raise ConfigError(f"{bad})")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"{bad}): unknown option {unknown[0]!r}; options are {', '.join(OPTIONS)}")
    batch_size = _positive(options.get("batch_size"), int, DEFAULT_BATCH_SIZE, "batch_size", shown)
    timeout = _positive(options.get("timeout"), float, DEFAULT_TIMEOUT_S, "timeout", shown)
    token = None if "token" not in options else check_token(options["token"], f"reward.names: {shown!r}: token")
    url = urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))
    return RemoteSpec(url, int(batch_size), float(timeout), token)


def _positive(raw: str | None, kind: type, default: float, key: str, name: str) -> float:
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if not 0 < value < float("inf"):
        raise ConfigError(f"reward.names: {name!r}: {key} must be a positive {kind.__name__}, got {raw!r}")
    return value


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (as written, not resolved) is this machine: ``localhost``, 127.0.0.0/8 or ::1."""
    if host is None:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def proxy_of(url: str) -> str | None:
    """The proxy the environment (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) puts before
    ``url``, credentials hidden; None for a loopback address, which is always reached directly."""
    parts = urlsplit(url)
    if is_loopback(parts.hostname) or urllib.request.proxy_bypass(parts.netloc):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path, "", ""))


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_TIMEOUT_S",
    "OPTIONS",
    "RemoteSpec",
    "is_loopback",
    "is_remote",
    "parse_remote",
    "proxy_of",
    "redacted",
]
