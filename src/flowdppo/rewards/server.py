"""``flowdppo reward-server``: one reward served over HTTP (FastAPI on uvicorn), protocol ``remote.PROTOCOL``.

    flowdppo reward-server --reward classifier_prob --port 8000      # a digits reward
    flowdppo reward-server --reward pickscore --port 8001            # an image reward, name or name@path
    flowdppo reward-server --reward my_rewards:score --port 8002     # your own module:function

The trainer uses it as ``reward.names=[http://127.0.0.1:8000]``. Requests are scored one at a time (the
reward is not asked to be thread-safe, and a GPU holds one batch), while the next request is received.
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import Any

import torch
from torch import Tensor

from flowdppo.errors import ConfigError, RewardError
from flowdppo.rewards import Reward, load_user_reward
from flowdppo.rewards.remote import PROTOCOL, SERVE_EXTRA, decode_request, encode_scores, is_remote


def require_serve_extra() -> None:
    """One line saying how to install FastAPI and uvicorn when they are missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"reward-server needs the serve extra: {SERVE_EXTRA}") from err


def resolve_reward(name: str, device: torch.device | str) -> Reward:
    """A digits reward (``classifier_prob``, ...), an image reward (``name``, ``name@path``) or ``module:function``."""
    from flowdppo.rewards.image import IMAGE_REWARDS, make_image_reward
    from flowdppo.tasks.digits.rewards import DIGITS_REWARDS, make_digits_reward

    name = name.strip()
    if is_remote(name):
        raise ConfigError(f"--reward: {name!r} is a server's address; serve a reward by name or module:function")
    if name in DIGITS_REWARDS:
        from flowdppo.tasks.digits.classifier import load_classifier

        return make_digits_reward(name, load_classifier().to(device))
    if name.partition("@")[0].strip() in IMAGE_REWARDS:
        return make_image_reward(name, device)
    if ":" in name:
        return load_user_reward(name)
    raise ConfigError(f"--reward: unknown reward {name!r}; choose from {', '.join([*DIGITS_REWARDS, *IMAGE_REWARDS])} "
                      "(name@model_path for model rewards) or give your own as module:function")  # fmt: skip


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def score_request(reward: Reward, name: str, body: bytes, device: torch.device | str) -> bytes:
    """The answer body to a ``POST /score`` body: the reward's ``(B,)`` scores (not checked for finiteness:
    the client does that). ValueError / RewardError when the request or the reward's output is wrong."""
    images, prompts, metadata = decode_request(body)
    images = images.to(device)
    try:
        scores = reward(images, prompts, metadata)
    except Exception as err:
        raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
    if not isinstance(scores, Tensor) or scores.shape != (images.shape[0],):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise RewardError(f"reward {name!r} returned {got}; a reward returns a tensor of shape ({images.shape[0]},)")
    return encode_scores(scores)


def make_app(reward: Reward, name: str, device: torch.device | str = "cpu"):
    """The FastAPI app: ``GET /health`` and ``POST /score``; a reward that fails answers 422 with one line."""
    from fastapi import FastAPI, Response
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="flowdppo reward server", docs_url=None, redoc_url=None)
    one_at_a_time = threading.Lock()

    def locked_score(body: bytes) -> bytes:
        with one_at_a_time:
            return score_request(reward, name, body, device)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"reward": name, "protocol": PROTOCOL}

    async def score(request) -> Response:  # a plain Starlette route: the body as it came
        body = await request.body()  # received while an earlier request is scored
        try:
            answer = await run_in_threadpool(locked_score, body)
        except (RewardError, ValueError) as err:
            detail = " ".join(str(err).split())
            print(f"flowdppo reward-server: {detail}", file=sys.stderr, flush=True)
            return JSONResponse({"detail": detail}, status_code=422)
        return Response(answer, media_type="application/octet-stream")

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


def run_server(app, sock: socket.socket, ready_line: str) -> None:
    """Serve ``app`` on ``sock`` until interrupted; print ``ready_line`` once it accepts requests."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                print(ready_line, flush=True)

    AnnouncingServer(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


def serve(reward_name: str, host: str = "127.0.0.1", port: int = 8000, device: str | None = None) -> None:
    """Load the reward ``reward_name`` on ``device`` and serve it at ``http://host:port`` until interrupted."""
    require_serve_extra()
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: must be in 0..65535, got {port}")
    sock = bind(host, port)  # a port in use is found before a model is loaded
    try:
        device = device or default_device()
        reward = resolve_reward(reward_name, device)
        name, url = reward_name.strip(), url_of(sock, host)
        ready = f"flowdppo reward-server: serving {name!r} at {url} (reward.names=[{url}])"
        run_server(make_app(reward, name, device), sock, ready)
    finally:
        sock.close()


__all__ = ["bind", "default_device", "make_app", "require_serve_extra", "resolve_reward", "run_server", "score_request",
           "serve", "url_of"]  # fmt: skip
