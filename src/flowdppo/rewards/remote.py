"""A reward computed by a reward server (``flowdppo reward-server``) over HTTP.

``reward.names=[http://HOST:PORT]`` scores with the reward the server serves, like any other reward, logged as
``reward/remote:NAME`` (the name the server declares, the same whatever its address). Options go in the query
(quote the name in an override: ``reward.names=['http://HOST:PORT?batch_size=16&timeout=300']``):
``batch_size`` images per request (default 32, at most the server's ``--max-images``), ``timeout`` seconds for
one whole answer (default 120) and ``token``, the server's token (better: the ``FLOWDPPO_REWARD_TOKEN``
environment variable, which keeps it out of the run's config). Loopback addresses never go through a proxy;
others follow ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY``, and a failure through a proxy names it.

Protocol 1 (``wire.PROTOCOL``):

- ``GET /health`` -> ``{"reward": NAME, "protocol": 1, "max_images": N, "max_body_bytes": M}``;
- ``POST /score`` with a safetensors body: tensor ``images`` ``(B, C, H, W)`` in the trainer's dtype (float32
  images arrive bit for bit), tensor ``prompts`` ``(B,)`` int64 when the prompts are labels, else the header
  entry ``prompts`` (a JSON list of strings); header entry ``metadata`` (a JSON list of ``B`` dicts, or null).
  The answer is a safetensors body with ``scores`` ``(B,)`` float32, or a 4xx ``{"detail": one line}``;
- with a token, every request carries ``Authorization: Bearer TOKEN`` (else HTTP 401).

The client checks the server at start (``GET /health``), sends ``batch_size`` images per request with up to
``IN_FLIGHT`` requests at once (results kept in order), retries a request that got no answer or a 5xx after
each of ``RETRY_DELAYS_S`` and checks every answer: one finite score per image, else ``RewardError``.
Requests run on an event loop in a daemon thread, so an interrupted trainer exits at once.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor

from flowdppo.errors import ConfigError, RewardError
from flowdppo.rewards.address import (
    DEFAULT_BATCH_SIZE,
    RemoteSpec,
    is_loopback,
    is_remote,
    parse_remote,
    proxy_of,
    redacted,
)
from flowdppo.rewards.wire import (
    PROTOCOL,
    TOKEN_ENV,
    check_token,
    decode_request,
    decode_scores,
    encode_request,
    encode_scores,
)

CONNECT_TIMEOUT_S = 5.0
RETRY_DELAYS_S = (0.5, 1.0, 2.0)  # waits between tries: 4 tries in all, backing off exponentially
IN_FLIGHT = 2  # requests of one reward at once: the server scores chunk k while chunk k + 1 travels
SERVE_EXTRA = "pip install 'flowdppo[serve]'"


# The protocol


def check_scores(scores: Tensor, batch: int, url: str) -> Tensor:
    """``scores`` if it is ``batch`` finite values ``(batch,)``; a RewardError otherwise."""
    if scores.shape != (batch,):
        raise RewardError(
            f"reward server {url} returned scores of shape {tuple(scores.shape)} for {batch} images; "
            f"it must return one score per image ({batch},)"
        )
    finite = torch.isfinite(scores)
    if not finite.all():
        raise RewardError(
            f"reward server {url} returned a non-finite score (NaN or inf) for {int((~finite).sum())} of {batch} images"
        )
    return scores.to(torch.float32)


# The client


class _ServerBusy(Exception):
    """An HTTP 5xx: the server (or a proxy before it) may answer a later try."""


class NoAnswer(RewardError):
    """Every try went unanswered: no connection, or a 5xx each time."""


def import_httpx():
    """``httpx``, or one line saying how to install it."""
    try:
        import httpx
    except ImportError as err:
        raise ConfigError(f"reward.names: a remote reward needs the serve extra: {SERVE_EXTRA}") from err
    return httpx


async def with_retries(
    call: Callable[[], Awaitable[Any]], url: str, delays: Sequence[float] | None = None, proxy: str | None = None
) -> Any:
    """``await call()``, tried again after each of ``delays`` (``RETRY_DELAYS_S``) while the server gives no
    answer (a connection error) or a 5xx; then a ``NoAnswer`` naming the last failure and the ``proxy``."""
    httpx = import_httpx()
    delays = RETRY_DELAYS_S if delays is None else delays
    for wait in (*delays, None):
        try:
            return await call()
        except (httpx.TransportError, _ServerBusy) as err:
            if wait is None:
                detail = " ".join(str(err).split()) or "no detail"
                via = (
                    (
                        f" through the proxy {proxy} (from HTTP_PROXY / HTTPS_PROXY / ALL_PROXY; add the host to "
                        "NO_PROXY to connect directly)"
                    )
                    if proxy
                    else ""
                )
                raise NoAnswer(
                    f"reward server {url}: no answer after {len(delays) + 1} tries "
                    f"({type(err).__name__}: {detail}){via}"
                ) from err
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


def _checked(response, url: str):
    """``response`` if it is a 2xx; 5xx -> ``_ServerBusy`` (retried), others -> RewardError with the server's detail."""
    if response.status_code < 300:
        return response
    try:
        detail = response.json().get("detail", "")
    except Exception:
        detail = response.text
    detail = " ".join(str(detail).split())[:300]
    if response.status_code >= 500:
        busy = "; the server answers its --max-connections at once already" if response.status_code == 503 else ""
        raise _ServerBusy(f"HTTP {response.status_code} {detail}{busy}")
    fix = (
        f"; give the trainer the server's token in {TOKEN_ENV} (or token=... in the address)"
        if response.status_code == 401
        else ""
    )
    raise RewardError(f"reward server {url}: HTTP {response.status_code} to {response.url.path}: {detail}{fix}")


def parse_health(response, url: str) -> dict:
    """A ``GET /health`` answer ``{"reward": NAME, "protocol": N, "max_images": .., "max_body_bytes": ..}``,
    checked to be a server this client speaks to (the limits are None when the server declares none)."""
    try:
        health = response.json()
        name, protocol = str(health["reward"]), int(health["protocol"])
        limits = {
            key: None if health.get(key) is None else int(health[key]) for key in ("max_images", "max_body_bytes")
        }
    except Exception as err:
        raise RewardError(f"reward server {url}: /health is not a flowdppo reward server's answer") from err
    if protocol != PROTOCOL:
        raise RewardError(
            f"reward server {url} speaks protocol {protocol}; this flowdppo speaks {PROTOCOL} "
            "(run the same flowdppo version on both sides)"
        )
    return {"reward": name, "protocol": protocol, **limits}


@dataclass
class PendingScores:
    """Scores on their way: ``result()`` waits for every chunk and returns the ``(B,)`` scores in order."""

    parts: list[Future]
    device: torch.device

    def result(self) -> Tensor:
        return torch.cat([part.result() for part in self.parts]).to(self.device)


class RemoteReward:
    """The reward a server serves, called like any reward; ``submit`` returns without waiting.

    Requests run on an asyncio loop in a daemon thread, so waiting for them is interruptible (Ctrl-C) and an
    interrupted process does not wait for them. ``timeout`` bounds each try from connecting to the last byte
    of the answer; a try that runs past it is not retried (the server is still busy with it).
    """

    def __init__(self, spec: RemoteSpec, in_flight: int = IN_FLIGHT) -> None:
        httpx = import_httpx()
        token = spec.token or os.environ.get(TOKEN_ENV) or None
        headers = {"authorization": f"Bearer {check_token(token, TOKEN_ENV)}"} if token else {}
        self.spec, self.proxy = spec, proxy_of(spec.url)
        self.served, self.name, self.batch_size, self.max_body = "", spec.url, spec.batch_size, None
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
            headers=headers,
            trust_env=not is_loopback(urlsplit(spec.url).hostname),
        )
        self.slots = asyncio.Semaphore(max(1, in_flight))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="flowdppo-remote-reward", daemon=True).start()

    def connect(self) -> None:
        """``GET /health`` (with retries): the served reward's name and the server's limits."""
        try:
            health = self.wait(self.request("/health", lambda: self.client.get(f"{self.spec.url}/health")))
        except NoAnswer as err:
            raise NoAnswer(
                f"{err}; start it with: flowdppo reward-server --reward NAME "
                f"--port {urlsplit(self.spec.url).port or 80}"
            ) from err
        health = parse_health(health, self.spec.url)
        self.served, self.name, self.max_body = health["reward"], f"remote:{health['reward']}", health["max_body_bytes"]
        self.batch_size = min(self.spec.batch_size, health["max_images"] or self.spec.batch_size)

    def wait(self, coroutine: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def request(self, path: str, send: Callable[[], Awaitable[Any]]):
        """The checked answer of ``send()`` (with retries), each try bounded by ``timeout`` in all."""
        url, timeout = self.spec.url, self.spec.timeout

        async def once():
            try:
                response = await asyncio.wait_for(send(), timeout)
            except asyncio.TimeoutError:
                raise RewardError(
                    f"reward server {url}: no complete answer to {path} within {timeout:g} s; if the "
                    f"server is only slow, give it longer with timeout=SECONDS in the address "
                    f"(reward.names=['{url}?timeout=600'])"
                ) from None
            return _checked(response, url)

        return await with_retries(once, url, proxy=self.proxy)

    async def post(self, body: bytes, batch: int) -> Tensor:
        """One ``POST /score``: the checked ``(batch,)`` scores."""
        url = self.spec.url
        async with self.slots:
            response = await self.request(
                "/score",
                lambda: self.client.post(
                    f"{url}/score", content=body, headers={"content-type": "application/octet-stream"}
                ),
            )
        return check_scores(decode_scores(response.content, url), batch, url)

    def encode(self, images: Tensor, prompts: Any, metadata: Any) -> bytes:
        """A request body, checked against the server's ``--max-body-mb``."""
        body, batch = encode_request(images, prompts, metadata), images.shape[0]
        if self.max_body is not None and len(body) > self.max_body:
            fits = int(batch * self.max_body / len(body))
            fix = f"lower batch_size in the address to {fits}" if fits else "restart the server with more --max-body-mb"
            raise RewardError(
                f"reward server {self.spec.url}: a request of {batch} images is {len(body) / 2**20:.3g} "
                f"MB, over the server's --max-body-mb {self.max_body / 2**20:.3g}; {fix}"
            )
        return body

    def submit(self, images: Tensor, prompts: Tensor | Sequence[Any], metadata: Any = None) -> PendingScores:
        """Send ``images`` in chunks of ``batch_size``, up to ``in_flight`` requests at once; returns at once."""
        device, images, size = images.device, images.detach().cpu(), self.batch_size
        parts = []
        for i in range(0, images.shape[0], size):
            body = self.encode(
                images[i : i + size], prompts[i : i + size], None if metadata is None else metadata[i : i + size]
            )
            parts.append(asyncio.run_coroutine_threadsafe(self.post(body, min(size, images.shape[0] - i)), self.loop))
        return PendingScores(parts, device)

    def __call__(self, images: Tensor, prompts: Tensor | Sequence[Any], metadata: Any = None) -> Tensor:
        """``(B,)`` float32 scores on the images' device."""
        return self.submit(images, prompts, metadata).result().to(images.device)

    def close(self) -> None:
        """Close the connections and stop the loop (requests in flight are dropped)."""
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(CONNECT_TIMEOUT_S)
            self.loop.call_soon_threadsafe(self.loop.stop)


def load_remote_reward(name: str, in_flight: int = IN_FLIGHT) -> RemoteReward:
    """The reward served at ``name`` (``http://HOST:PORT[?options]``), its server checked once (with retries)."""
    reward = RemoteReward(parse_remote(name), in_flight)
    try:
        reward.connect()
    except Exception:
        reward.close()
        raise
    return reward


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "IN_FLIGHT",
    "PROTOCOL",
    "RETRY_DELAYS_S",
    "TOKEN_ENV",
    "NoAnswer",
    "PendingScores",
    "RemoteReward",
    "RemoteSpec",
    "check_scores",
    "decode_request",
    "decode_scores",
    "encode_request",
    "encode_scores",
    "is_loopback",
    "is_remote",
    "load_remote_reward",
    "parse_health",
    "parse_remote",
    "proxy_of",
    "redacted",
    "with_retries",
]
