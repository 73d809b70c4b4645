"""``flowdppo reward-server``: one reward served over HTTP (FastAPI on uvicorn), protocol ``wire.PROTOCOL``.

    flowdppo reward-server --reward classifier_prob --port 8000      # a digits reward
    flowdppo reward-server --reward pickscore --port 8001            # an image reward, name or name@path
    flowdppo reward-server --reward my_rewards:score --port 8002     # your own module:function

The trainer uses it as ``reward.names=[http://127.0.0.1:8000]``. Requests are scored one at a time (the
reward is not asked to be thread-safe, and a GPU holds one batch), while the next request is received.

It listens on 127.0.0.1 unless ``--host`` says otherwise, and warns when it listens further without a token.
With a token (``--token`` or ``FLOWDPPO_REWARD_TOKEN``) every request needs ``Authorization: Bearer TOKEN``
(compared in constant time; else HTTP 401). A request body is bounded by ``--max-body-mb`` (its Content-Length,
then the bytes as they arrive) and its images by ``--max-images`` (read from the header, before any tensor is
made): over either, HTTP 413. At most ``--max-connections`` connections are answered at once (so its memory stays
near that many bodies); one more is answered HTTP 503, which the trainer retries. Every request it cannot score
is answered 4xx with one line, and one line on its stderr.
"""

from __future__ import annotations

import hmac
import os
import socket
import sys
import threading
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from flowdppo.errors import ConfigError, RewardError
from flowdppo.rewards import Reward
from flowdppo.rewards.address import is_loopback, is_remote
from flowdppo.rewards.remote import SERVE_EXTRA
from flowdppo.rewards.wire import PROTOCOL, TOKEN_ENV, RequestError, check_token, decode_request, encode_scores

DEFAULT_MAX_IMAGES = 256
DEFAULT_MAX_BODY_MB = 512.0  # 32 float32 RGB images of 1024x1024 are 403 MB
DEFAULT_MAX_CONNECTIONS = 32  # a trainer process keeps remote.IN_FLIGHT (2) requests open: 16 processes


def require_serve_extra() -> None:
    """One line saying how to install FastAPI and uvicorn when they are missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"reward-server needs the serve extra: {SERVE_EXTRA}") from err


def resolve_reward(name: str, device: torch.device | str) -> Reward:
    """A digits reward (``classifier_prob``, ...), an image reward (``name``, ``name@path``) or ``module:function``."""
    from flowdppo.rewards.registry import RewardContext, load_reward

    name = name.strip()
    if is_remote(name):
        raise ConfigError(f"--reward: {name!r} is a server's address; serve a reward by name or module:function")
    return load_reward(name, ("digits", "image"), RewardContext(device), key="--reward")[1]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def score_request(
    reward: Reward,
    name: str,
    body: bytes,
    device: torch.device | str,
    max_images: int | None = None,
    lock: AbstractContextManager | None = None,
) -> bytes:
    """The answer body to a ``POST /score`` body: the reward's ``(B,)`` scores (not checked for finiteness:
    the client does that), scored holding ``lock``. RequestError when the request is malformed or over
    ``max_images``, RewardError when the reward fails or its output is wrong."""
    images, prompts, metadata = decode_request(body, max_images)
    with lock or nullcontext():
        try:
            scores = reward(images.to(device), prompts, metadata)
        except Exception as err:
            raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
    if not isinstance(scores, Tensor) or scores.shape != (images.shape[0],):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise RewardError(f"reward {name!r} returned {got}; a reward returns a tensor of shape ({images.shape[0]},)")
    return encode_scores(scores)


def token_problem(authorization: str | None, token: str | None) -> str | None:
    """Why an ``Authorization`` header does not carry ``token`` (compared in constant time); None when it does
    or when no token is asked."""
    if token is None:
        return None
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return f"no token (this server needs Authorization: Bearer TOKEN, TOKEN its --token or {TOKEN_ENV})"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return f"wrong token (this server needs its --token or {TOKEN_ENV})"
    return None


async def read_body(request, max_bytes: int) -> bytes:
    """A request's body, refused (413) once its Content-Length or the bytes received so far pass ``max_bytes``
    (a client may send more than it declares, or declare nothing: chunked)."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/octet-stream":
        raise RequestError(415, f"content-type {kind[:40]!r}; send the safetensors body as application/octet-stream")
    over = RequestError(
        413,
        f"request body over the server's --max-body-mb {max_bytes / 2**20:g}; send fewer images "
        "per request (batch_size in the address)",
    )
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise over
    from starlette.requests import ClientDisconnect

    parts, size = [], 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > max_bytes:
                raise over
            parts.append(part)
    except ClientDisconnect:  # gone (or a malformed chunked body, which uvicorn answers itself)
        raise RequestError(400, f"the client disconnected after {size} bytes of its body") from None
    return b"".join(parts)


def make_app(
    reward: Reward,
    name: str,
    device: torch.device | str = "cpu",
    token: str | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20),
):
    """The FastAPI app: ``GET /health`` and ``POST /score``, both behind ``token`` when one is given. A request it
    cannot score is answered 4xx ``{"detail": one line}`` and logged in one line on stderr."""
    from fastapi import FastAPI, Response
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="flowdppo reward server", docs_url=None, redoc_url=None, openapi_url=None)
    one_at_a_time = threading.Lock()

    def refuse(request, status: int, detail: str) -> JSONResponse:
        detail = " ".join(detail.split())
        client = request.client.host if request.client else "?"
        print(
            f"flowdppo reward-server: HTTP {status} to {request.method} {request.url.path} from {client}: {detail}",
            file=sys.stderr,
            flush=True,
        )
        headers = {"www-authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    async def health(request) -> Response:
        problem = token_problem(request.headers.get("authorization"), token)
        if problem:
            return refuse(request, 401, problem)
        return JSONResponse(
            {"reward": name, "protocol": PROTOCOL, "max_images": max_images, "max_body_bytes": max_body_bytes}
        )

    async def score(request) -> Response:  # a plain Starlette route: the body as it comes
        problem = token_problem(request.headers.get("authorization"), token)
        if problem:  # before a byte of the body is read
            return refuse(request, 401, problem)
        try:
            body = await read_body(request, max_body_bytes)  # received while an earlier request is scored
            answer = await run_in_threadpool(score_request, reward, name, body, device, max_images, one_at_a_time)
        except RequestError as err:
            return refuse(request, err.status, str(err))
        except RewardError as err:
            return refuse(request, 422, str(err))
        return Response(answer, media_type="application/octet-stream")

    app.add_route("/health", health, methods=["GET"])
    app.add_route("/score", score, methods=["POST"])
    return app


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: a free port), or one line saying why it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--host: cannot resolve {host!r} ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"--port: cannot listen on {host}:{port} ({err.strerror}); choose another port") from err
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def server_config(app, max_connections: int = DEFAULT_MAX_CONNECTIONS):
    """uvicorn's settings for ``app``: quiet, and ``max_connections`` connections answered at once (a request on one
    more gets HTTP 503). uvicorn counts the asking connection itself against ``limit_concurrency``, hence the + 1."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=max_connections + 1)


def run_server(app, sock: socket.socket, ready_line: str, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
    """Serve ``app`` on ``sock`` until interrupted; print ``ready_line`` once it accepts requests."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                print(ready_line, flush=True)

    AnnouncingServer(server_config(app, max_connections)).run(sockets=[sock])


def exposure_warning(address: str, token: str | None) -> str | None:
    """The line to print when a server at ``address`` (as bound) is reachable beyond this machine without a token."""
    if token or is_loopback(address):
        return None
    return (
        f"flowdppo reward-server: warning: listening on {address} without a token, so anyone who can reach this "
        f"port can use the reward; set {TOKEN_ENV} (or --token) here and {TOKEN_ENV} for the trainer"
    )


def server_token(token: str | None) -> str | None:
    """``--token``, else ``FLOWDPPO_REWARD_TOKEN``, else None; one line when it cannot be a bearer token."""
    if token is not None:
        return check_token(token, "--token")
    token = os.environ.get(TOKEN_ENV) or None
    return None if token is None else check_token(token, TOKEN_ENV)


def serve(
    reward_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | None = None,
    token: str | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Load the reward ``reward_name`` on ``device`` and serve it at ``http://host:port`` until interrupted."""
    require_serve_extra()
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: must be in 0..65535, got {port}")
    if max_images < 1:
        raise ConfigError(f"--max-images: must be at least 1, got {max_images}")
    if not 0 < max_body_mb < float("inf"):
        raise ConfigError(f"--max-body-mb: must be a positive number of MB, got {max_body_mb}")
    if max_connections < 1:
        raise ConfigError(f"--max-connections: must be at least 1, got {max_connections}")
    token = server_token(token)
    sock = bind(host, port)  # a port in use is found before a model is loaded
    try:
        warning = exposure_warning(sock.getsockname()[0], token)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        device = device or default_device()
        reward = resolve_reward(reward_name, device)
        name, url = reward_name.strip(), url_of(sock, host)
        ready = f"flowdppo reward-server: serving {name!r} at {url} (reward.names=[{url}])"
        app = make_app(reward, name, device, token, max_images, int(max_body_mb * 2**20))
        run_server(app, sock, ready + (f"; requests need the token ({TOKEN_ENV})" if token else ""), max_connections)
    finally:
        sock.close()


__all__ = [
    "DEFAULT_MAX_BODY_MB",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_IMAGES",
    "bind",
    "default_device",
    "exposure_warning",
    "make_app",
    "read_body",
    "require_serve_extra",
    "resolve_reward",
    "run_server",
    "score_request",
    "serve",
    "server_config",
    "server_token",
    "token_problem",
    "url_of",
]
