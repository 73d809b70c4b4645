"""A reward computed by a reward server (``flowdppo reward-server``) over HTTP, and scoring that overlaps it.

``reward.names=[http://HOST:PORT]`` scores with the reward the server serves, like any other reward. Options go
in the query (quote the name in an override: ``reward.names=['http://HOST:PORT?batch_size=16&timeout=300']``):
``batch_size`` images per request (default 32) and ``timeout`` seconds to wait for one answer (default 120).

Protocol 1 (``PROTOCOL``):

- ``GET /health`` -> ``{"reward": NAME, "protocol": 1}``;
- ``POST /score`` with a safetensors body: tensor ``images`` ``(B, C, H, W)`` in the trainer's dtype (float32
  images arrive bit for bit), tensor ``prompts`` ``(B,)`` int64 when the prompts are labels, else the header
  entry ``prompts`` (a JSON list of strings); header entry ``metadata`` (a JSON list of ``B`` dicts, or null).
  The answer is a safetensors body with ``scores`` ``(B,)`` float32, or HTTP 422 ``{"detail": one line}``.

The client checks the server at start (``GET /health``), sends ``batch_size`` images per request with up to
``IN_FLIGHT`` requests at once (results kept in order), retries a request that got no answer or a 5xx after
each of ``RETRY_DELAYS_S`` and checks every answer: one finite score per image, else ``RewardError``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from flowdppo.errors import ConfigError, RewardError
from flowdppo.prompts import PromptBatch
from flowdppo.rewards import score

PROTOCOL = 1
DEFAULT_BATCH_SIZE = 32
DEFAULT_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 5.0
RETRY_DELAYS_S = (0.5, 1.0, 2.0)  # waits between tries: 4 tries in all, backing off exponentially
IN_FLIGHT = 2  # requests of one reward at once: the server scores chunk k while chunk k + 1 travels
SERVE_EXTRA = "pip install 'flowdppo[serve]'"
_HOST = re.compile(r"^[A-Za-z0-9._\-:%]+$")


# The address


@dataclass(frozen=True)
class RemoteSpec:
    """Where the server is (``url`` without the query) and how to call it."""

    url: str
    batch_size: int = DEFAULT_BATCH_SIZE
    timeout: float = DEFAULT_TIMEOUT_S


def is_remote(name: str) -> bool:
    """Whether a reward name is a server's address (``http://`` or ``https://``)."""
    return name.strip().lower().startswith(("http://", "https://"))


def parse_remote(name: str) -> RemoteSpec:
    """``http[s]://HOST:PORT[/path][?batch_size=N&timeout=S]`` -> ``RemoteSpec``; anything else is a ConfigError."""
    bad = f"reward.names: {name!r} is not a reward server address (http://HOST:PORT"
    parts = urlsplit(name.strip())
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number in 0..65535)
    except ValueError as err:
        raise ConfigError(f"{bad}; {err})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or not _HOST.match(parts.hostname):
        raise ConfigError(f"{bad})")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - {"batch_size", "timeout"})
    if unknown:
        raise ConfigError(f"{bad}): unknown option {unknown[0]!r}; options are batch_size and timeout")
    batch_size = _positive(options.get("batch_size"), int, DEFAULT_BATCH_SIZE, "batch_size", name)
    timeout = _positive(options.get("timeout"), float, DEFAULT_TIMEOUT_S, "timeout", name)
    url = urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))
    return RemoteSpec(url, int(batch_size), float(timeout))


def _positive(raw: str | None, kind: type, default: float, key: str, name: str) -> float:
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if not value > 0:
        raise ConfigError(f"reward.names: {name!r}: {key} must be a positive {kind.__name__}, got {raw!r}")
    return value


# The protocol


def reward_arguments(prompts: Any) -> tuple[Any, Any]:
    """``(prompts, metadata)`` as a reward is called with them (``rewards.score``): texts and metadata dicts of
    a ``PromptBatch``, other prompts (labels) as they are with ``None``."""
    return (prompts.text, prompts.metadata) if isinstance(prompts, PromptBatch) else (prompts, None)


def encode_request(images: Tensor, prompts: Tensor | Sequence[Any], metadata: Sequence[dict] | None) -> bytes:
    """The body of ``POST /score``: images (their own dtype, exact), prompts and metadata."""
    tensors = {"images": images.detach().cpu().contiguous()}
    header = {"protocol": str(PROTOCOL), "metadata": json.dumps(None if metadata is None else list(metadata),
                                                                default=str)}  # fmt: skip
    if isinstance(prompts, Tensor):
        tensors["prompts"] = prompts.detach().cpu().to(torch.int64).contiguous()
    else:
        header["prompts"] = json.dumps([p if isinstance(p, (str, int)) else str(p) for p in prompts])
    return save_tensors(tensors, metadata=header)


def decode_request(body: bytes) -> tuple[Tensor, Tensor | list, list | None]:
    """``(images, prompts, metadata)`` of a ``POST /score`` body; ValueError when it is not one."""
    try:
        tensors = load_tensors(body)
        header = _header(body)
        prompts = tensors["prompts"] if "prompts" in tensors else json.loads(header["prompts"])
        images, metadata = tensors["images"], json.loads(header.get("metadata", "null"))
    except Exception as err:
        raise ValueError(f"not a protocol-{PROTOCOL} request ({type(err).__name__}: {err})") from err
    if len(prompts) != images.shape[0] or (metadata is not None and len(metadata) != images.shape[0]):
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return images, prompts, metadata


def _header(body: bytes) -> dict[str, str]:
    size = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + size]).get("__metadata__", {})


def encode_scores(scores: Tensor) -> bytes:
    """The body of a ``POST /score`` answer: ``scores`` ``(B,)`` float32."""
    return save_tensors({"scores": scores.detach().cpu().to(torch.float32).contiguous()})


def decode_scores(body: bytes, url: str) -> Tensor:
    """The scores of a ``POST /score`` answer; RewardError when it is not one."""
    try:
        return load_tensors(body)["scores"]
    except Exception as err:
        raise RewardError(f"reward server {url}: its answer is not a protocol-{PROTOCOL} score tensor "
                          f"({type(err).__name__})") from err  # fmt: skip


def check_scores(scores: Tensor, batch: int, url: str) -> Tensor:
    """``scores`` if it is ``batch`` finite values ``(batch,)``; a RewardError otherwise."""
    if scores.shape != (batch,):
        raise RewardError(f"reward server {url} returned scores of shape {tuple(scores.shape)} for {batch} images; "
                          f"it must return one score per image ({batch},)")  # fmt: skip
    finite = torch.isfinite(scores)
    if not finite.all():
        raise RewardError(f"reward server {url} returned a non-finite score (NaN or inf) for "
                          f"{int((~finite).sum())} of {batch} images")  # fmt: skip
    return scores.to(torch.float32)


# The client


class _ServerBusy(Exception):
    """An HTTP 5xx: the server (or a proxy before it) may answer a later try."""


def import_httpx():
    """``httpx``, or one line saying how to install it."""
    try:
        import httpx
    except ImportError as err:
        raise ConfigError(f"reward.names: a remote reward needs the serve extra: {SERVE_EXTRA}") from err
    return httpx


def with_retries(call: Callable[[], Any], url: str, delays: Sequence[float] | None = None) -> Any:
    """``call()``, tried again after each of ``delays`` (``RETRY_DELAYS_S``) while the server gives no answer
    (a connection error, a timeout) or a 5xx; then a RewardError naming the last failure."""
    httpx = import_httpx()
    delays = RETRY_DELAYS_S if delays is None else delays
    for wait in (*delays, None):
        try:
            return call()
        except (httpx.TransportError, _ServerBusy) as err:
            if wait is None:
                detail = " ".join(str(err).split()) or "no detail"
                raise RewardError(f"reward server {url}: no answer after {len(delays) + 1} tries "
                                  f"({type(err).__name__}: {detail})") from err  # fmt: skip
            time.sleep(wait)
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
        raise _ServerBusy(f"HTTP {response.status_code} {detail}")
    raise RewardError(f"reward server {url}: HTTP {response.status_code} to {response.url.path}: {detail}")


def fetch_health(client, url: str) -> dict:
    """``GET /health`` once: ``{"reward": NAME, "protocol": N}``, checked to be a server this client speaks to."""
    response = _checked(client.get(f"{url}/health"), url)
    try:
        health = response.json()
        name, protocol = str(health["reward"]), int(health["protocol"])
    except Exception as err:
        raise RewardError(f"reward server {url}: /health is not a flowdppo reward server's answer") from err
    if protocol != PROTOCOL:
        raise RewardError(f"reward server {url} speaks protocol {protocol}; this flowdppo speaks {PROTOCOL} "
                          "(run the same flowdppo version on both sides)")  # fmt: skip
    return {"reward": name, "protocol": protocol}


def post_scores(client, spec: RemoteSpec, images: Tensor, prompts: Any, metadata: Any) -> Tensor:
    """One ``POST /score`` (with retries): the checked ``(B,)`` scores of ``images`` (on the CPU)."""
    body = encode_request(images, prompts, metadata)

    def once() -> Tensor:
        response = client.post(f"{spec.url}/score", content=body,
                               headers={"content-type": "application/octet-stream"})  # fmt: skip
        return decode_scores(_checked(response, spec.url).content, spec.url)

    return check_scores(with_retries(once, spec.url), images.shape[0], spec.url)


@dataclass
class PendingScores:
    """Scores on their way: ``result()`` waits for every chunk and returns the ``(B,)`` scores in order."""

    parts: list[Future]
    device: torch.device

    def result(self) -> Tensor:
        return torch.cat([part.result() for part in self.parts]).to(self.device)


class RemoteReward:
    """The reward a server serves, called like any reward; ``submit`` returns without waiting."""

    def __init__(self, spec: RemoteSpec, client, served: str, in_flight: int = IN_FLIGHT) -> None:
        self.spec, self.client, self.served = spec, client, served
        self.name = spec.url
        self.pool = ThreadPoolExecutor(max(1, in_flight), thread_name_prefix="flowdppo-remote-reward")

    def submit(self, images: Tensor, prompts: Tensor | Sequence[Any], metadata: Any = None) -> PendingScores:
        """Send ``images`` in chunks of ``batch_size``, up to ``in_flight`` requests at once; returns at once."""
        device, images, size = images.device, images.detach().cpu(), self.spec.batch_size
        chunks = [(images[i : i + size], prompts[i : i + size], None if metadata is None else metadata[i : i + size])
                  for i in range(0, images.shape[0], size)]  # fmt: skip
        parts = [self.pool.submit(post_scores, self.client, self.spec, *chunk) for chunk in chunks]
        return PendingScores(parts, device)

    def __call__(self, images: Tensor, prompts: Tensor | Sequence[Any], metadata: Any = None) -> Tensor:
        """``(B,)`` float32 scores on the images' device."""
        return self.submit(images, prompts, metadata).result().to(images.device)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def load_remote_reward(name: str, in_flight: int = IN_FLIGHT) -> RemoteReward:
    """The reward served at ``name`` (``http://HOST:PORT[?options]``), its server checked once (with retries)."""
    spec = parse_remote(name)
    httpx = import_httpx()
    client = httpx.Client(timeout=httpx.Timeout(spec.timeout, connect=CONNECT_TIMEOUT_S))
    try:
        health = with_retries(lambda: fetch_health(client, spec.url), spec.url)
    except RewardError as err:
        client.close()
        raise RewardError(f"{err}; start it with: flowdppo reward-server --reward NAME "
                          f"--port {urlsplit(spec.url).port or 80}") from err  # fmt: skip
    return RemoteReward(spec, client, health["reward"], in_flight)


# Scoring a batch, remote rewards overlapped


def score_chunks(reward_fns: list[tuple[str, Any]], chunks: Iterable[Tensor] | Tensor, prompts: Any) -> Tensor:
    """Every reward's scores of the images decoded as ``chunks`` (in order) -> ``(B, num_rewards)`` float32.

    A reward with ``submit`` (a remote one) is sent each chunk as soon as it is decoded: its server scores it
    while the next chunk decodes and the in-process rewards run. The others score the whole batch at the end,
    exactly as ``rewards.score`` does.
    """
    chunks = [chunks] if isinstance(chunks, Tensor) else chunks
    remote = [k for k, (_, fn) in enumerate(reward_fns) if hasattr(fn, "submit")]
    pending: dict[int, list[PendingScores]] = {k: [] for k in remote}
    parts, start = [], 0
    for part in chunks:
        texts, metadata = reward_arguments(prompts[start : start + part.shape[0]])
        for k in remote:
            pending[k].append(reward_fns[k][1].submit(part, texts, metadata))
        parts.append(part)
        start += part.shape[0]
    images = torch.cat(parts)
    columns = []
    for k, (name, fn) in enumerate(reward_fns):
        if k in pending:
            scores = torch.cat([p.result() for p in pending[k]]).to(images.device)
            columns.append(check_scores(scores, images.shape[0], name))
        else:
            columns.append(score(fn, name, images, prompts))
    return torch.stack(columns, dim=1)


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "IN_FLIGHT",
    "PROTOCOL",
    "RETRY_DELAYS_S",
    "PendingScores",
    "RemoteReward",
    "RemoteSpec",
    "check_scores",
    "decode_request",
    "decode_scores",
    "encode_request",
    "encode_scores",
    "fetch_health",
    "is_remote",
    "load_remote_reward",
    "parse_remote",
    "post_scores",
    "score_chunks",
    "reward_arguments",
    "with_retries",
]
