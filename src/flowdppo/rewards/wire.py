"""The reward server's wire format (protocol ``PROTOCOL``): a ``POST /score`` body and its answer, as safetensors.

A request is checked from its header (tensor names, dtypes, shapes, byte sizes, the prompts and metadata
entries) before any tensor is made, so a request that is malformed or over ``max_images`` costs no memory
beyond its body. ``RequestError`` carries the HTTP status a server answers it with: 400 (not a safetensors
body), 413 (over a limit), 422 (well formed, but not what the protocol asks for).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from flowdppo.errors import ConfigError, RewardError

PROTOCOL = 1
TOKEN_ENV = "FLOWDPPO_REWARD_TOKEN"  # the bearer token, read by the server and by the trainer
IMAGE_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype -> bytes per value
TENSORS = ("images", "prompts")


class RequestError(ValueError):
    """A request the server cannot score, with the HTTP ``status`` it answers and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_token(token: str, where: str) -> str:
    """``token`` if it can travel in an ``Authorization: Bearer`` header; else one line naming ``where``."""
    if not token or not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(
            f"{where}: a token is one or more printable ASCII characters without spaces; make one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def encode_request(images: Tensor, prompts: Tensor | Sequence[Any], metadata: Sequence[dict] | None) -> bytes:
    """The body of ``POST /score``: images (their own dtype, exact), prompts and metadata."""
    tensors = {"images": images.detach().cpu().contiguous()}
    header = {
        "protocol": str(PROTOCOL),
        "metadata": json.dumps(None if metadata is None else list(metadata), default=str),
    }
    if isinstance(prompts, Tensor):
        tensors["prompts"] = prompts.detach().cpu().to(torch.int64).contiguous()
    else:
        header["prompts"] = json.dumps([p if isinstance(p, (str, int)) else str(p) for p in prompts])
    return save_tensors(tensors, metadata=header)


def decode_request(body: bytes, max_images: int | None = None) -> tuple[Tensor, Tensor | list, list | None]:
    """``(images, prompts, metadata)`` of a ``POST /score`` body, checked before a tensor is made; else
    ``RequestError``."""
    entries, header = read_header(body)
    batch = check_images(entries.get("images"), max_images)
    prompts = check_prompts(entries.get("prompts"), header, batch)
    metadata = parse_entry(header, "metadata", "null")
    if metadata is not None and not (
        isinstance(metadata, list) and len(metadata) == batch and all(isinstance(m, dict) for m in metadata)
    ):
        raise RequestError(422, f"header entry 'metadata' must be null or a JSON list of {batch} objects")
    try:
        tensors = load_tensors(body)
    except Exception as err:
        raise RequestError(400, f"not a protocol-{PROTOCOL} request ({type(err).__name__}: {err})") from err
    return tensors["images"], tensors["prompts"] if prompts is None else prompts, metadata


def read_header(body: bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries and the string metadata of a safetensors ``body``'s header."""
    bad = f"not a protocol-{PROTOCOL} request (a safetensors body)"
    size = int.from_bytes(body[:8], "little") if len(body) >= 8 else -1
    if not 0 < size <= len(body) - 8:
        raise RequestError(400, f"{bad}: its 8-byte header length is missing or past the body's end")
    try:
        entries = json.loads(body[8 : 8 + size])
    except (ValueError, RecursionError) as err:
        raise RequestError(400, f"{bad}: its header is not JSON ({err})") from None
    if not isinstance(entries, dict):
        raise RequestError(400, f"{bad}: its header is not a JSON object")
    header = entries.pop("__metadata__", None) or {}
    if not isinstance(header, dict) or not all(isinstance(v, str) for v in header.values()):
        raise RequestError(400, f"{bad}: its __metadata__ is not an object of strings")
    unknown = sorted(set(entries) - set(TENSORS))
    if unknown:
        raise RequestError(422, f"unknown tensor {unknown[0][:40]!r}; a request holds 'images' and 'prompts'")
    if header.get("protocol", str(PROTOCOL)) != str(PROTOCOL):
        raise RequestError(422, f"protocol {header['protocol'][:20]!r}; this server speaks protocol {PROTOCOL}")
    return entries, header


def check_images(entry: Any, max_images: int | None) -> int:
    """The number of images the header's ``images`` entry declares: a float ``(B, C, H, W)`` tensor whose bytes
    match its shape, ``1 <= B <= max_images``."""
    shape, dtype = tensor_entry(entry, "images")
    if dtype not in IMAGE_DTYPES:
        raise RequestError(422, f"images have dtype {dtype[:10]!r}; send floats ({', '.join(IMAGE_DTYPES)})")
    if len(shape) != 4 or shape[0] < 1:
        raise RequestError(422, f"images have shape {tuple(shape)[:8]}; send (B, C, H, W) with B >= 1")
    if max_images is not None and shape[0] > max_images:
        raise RequestError(
            413,
            f"{shape[0]} images in one request, over the server's --max-images {max_images}; "
            "send fewer per request (batch_size in the address)",
        )
    check_bytes(entry, shape, IMAGE_DTYPES[dtype], "images")
    return shape[0]


def check_prompts(entry: Any, header: dict[str, str], batch: int) -> list | None:
    """The prompts of the header entry ``prompts`` (a JSON list of ``batch`` strings or ints), or None when the
    request carries them as an int64 ``(batch,)`` tensor."""
    if entry is not None:
        shape, dtype = tensor_entry(entry, "prompts")
        if dtype != "I64" or shape != [batch]:
            raise RequestError(
                422,
                f"tensor 'prompts' is {dtype[:10]} {tuple(shape)[:8]}; send int64 ({batch},) "
                "labels, or the header entry 'prompts'",
            )
        check_bytes(entry, shape, 8, "prompts")
        return None
    if "prompts" not in header:
        raise RequestError(422, "no prompts: send the tensor 'prompts' or the header entry 'prompts'")
    prompts = parse_entry(header, "prompts", "null")
    if not isinstance(prompts, list) or not all(isinstance(p, (str, int)) for p in prompts):
        raise RequestError(422, f"header entry 'prompts' must be a JSON list of strings, got {type(prompts).__name__}")
    if len(prompts) != batch:
        raise RequestError(422, f"{batch} images but {len(prompts)} prompts")
    return prompts


def tensor_entry(entry: Any, name: str) -> tuple[list[int], str]:
    """``(shape, dtype)`` of a header's tensor entry; 422 when it is missing, 400 when it is not one."""
    if entry is None:
        raise RequestError(422, f"no tensor {name!r} in the request")
    shape, dtype = (entry.get("shape"), entry.get("dtype")) if isinstance(entry, dict) else (None, None)
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and isinstance(dtype, str)):
        raise RequestError(400, f"not a protocol-{PROTOCOL} request: tensor {name!r} has no valid shape and dtype")
    return shape, dtype


def check_bytes(entry: dict, shape: list[int], itemsize: int, name: str) -> None:
    """400 unless the entry's ``data_offsets`` span exactly the bytes its shape needs."""
    offsets = entry.get("data_offsets")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and offsets[1] - offsets[0] == math.prod(shape) * itemsize
    ):
        raise RequestError(
            400,
            f"not a protocol-{PROTOCOL} request: tensor {name!r} of shape {tuple(shape)[:8]} "
            "does not match its data bytes",
        )


def parse_entry(header: dict[str, str], key: str, default: str) -> Any:
    try:
        return json.loads(header.get(key, default))
    except (ValueError, RecursionError):
        raise RequestError(422, f"header entry {key!r} is not JSON") from None


def encode_scores(scores: Tensor) -> bytes:
    """The body of a ``POST /score`` answer: ``scores`` ``(B,)`` float32."""
    return save_tensors({"scores": scores.detach().cpu().to(torch.float32).contiguous()})


def decode_scores(body: bytes, url: str) -> Tensor:
    """The scores of a ``POST /score`` answer; RewardError when it is not one."""
    try:
        return load_tensors(body)["scores"]
    except Exception as err:
        raise RewardError(
            f"reward server {url}: its answer is not a protocol-{PROTOCOL} score tensor ({type(err).__name__})"
        ) from err


__all__ = [
    "PROTOCOL",
    "TOKEN_ENV",
    "RequestError",
    "check_token",
    "decode_request",
    "decode_scores",
    "encode_request",
    "encode_scores",
    "read_header",
]
