"""A reward through ``flowdppo reward-server`` vs in-process, and the trainer's idle time with and without overlap.

1. Throughput: images per second of the digits classifier reward (``classifier_prob``) in-process and through a
   server subprocess on loopback, ``--batch`` images per request, up to 2 requests in flight.
2. The reward stage of one epoch (``--images`` images decoded in chunks of ``--chunk``, as the trainer does):
   - sequential: decode every chunk, then one blocking call (requests one after another), the trainer's old path;
   - overlapped: ``score_chunks``: each chunk is sent as soon as it is decoded, 2 requests in flight.
   Idle time = the stage's wall time minus the trainer's own work in it (decoding). Two settings: the real digits
   classifier and decode (both tiny: HTTP dominates), and an emulated GPU model (``--model-ms`` per image on the
   server, ``--decode-ms`` per chunk in the trainer, as sleeps: the CPU is free while a GPU works).

    python benchmarks/remote_reward.py [--repeats 10] [--images 160] [--chunk 32] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import RESULTS_DIR, interleaved_times, write_result

from flowdppo.rewards import score_chunks
from flowdppo.rewards.registry import make_reward
from flowdppo.rewards.remote import load_remote_reward
from flowdppo.tasks.digits.classifier import load_classifier
from flowdppo.tasks.digits.data import to_unit_range

MODEL_MS = float(os.environ.get("REMOTE_BENCH_MODEL_MS", "2"))  # the emulated model's time per image, server side
_CLASSIFIER = None


def emulated_model(images, prompts, metadata=None):
    """``classifier_prob`` plus ``MODEL_MS`` per image of waiting: a reward model on a GPU, seen from the CPU."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        _CLASSIFIER = make_reward("classifier_prob", classifier=load_classifier())
    time.sleep(MODEL_MS * images.shape[0] / 1000)
    return _CLASSIFIER(images, prompts)


def start_server(reward: str, model_ms: float) -> tuple[subprocess.Popen, str]:
    """``flowdppo reward-server`` on a free loopback port; returns the process and its URL."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "REMOTE_BENCH_MODEL_MS": str(model_ms)}
    process = subprocess.Popen(
        [sys.executable, "-m", "flowdppo", "reward-server", "--reward", reward, "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = process.stdout.readline()
    if "http://" not in line:
        raise SystemExit(f"the server did not start: {line!r}")
    return process, line.split(" at ")[1].split()[0]


def decoded_chunks(latents: torch.Tensor, chunk: int, decode_ms: float, spent: list[float]):
    """The trainer's decoding, chunk by chunk; the time it takes is added to ``spent``."""
    for part in latents.split(chunk):
        start = time.perf_counter()
        images = to_unit_range(part)
        if decode_ms:
            time.sleep(decode_ms / 1000)  # an emulated VAE decode on a GPU
        spent.append(time.perf_counter() - start)
        yield images


def stage_times(fn: Callable[[list[float]], None], repeats: int) -> dict[str, float]:
    """Median wall time and median idle time (wall minus the trainer's decoding) of ``fn(spent)``, in ms."""
    walls, idles = [], []
    fn([])  # warm-up: connections open, threads started
    for _ in range(repeats):
        spent: list[float] = []
        start = time.perf_counter()
        fn(spent)
        wall = time.perf_counter() - start
        walls.append(wall)
        idles.append(wall - sum(spent))
    return {"wall_ms": 1000 * statistics.median(walls), "idle_ms": 1000 * statistics.median(idles)}


def epoch_stage(url: str, args, decode_ms: float) -> dict[str, dict[str, float]]:
    """The reward stage of one epoch, sequential vs overlapped, against the server at ``url``."""
    latents = torch.rand(args.images, 1, 8, 8) * 2 - 1
    labels = torch.arange(args.images) % 10
    spec = f"{url}?batch_size={args.chunk}"
    one_at_a_time, in_flight = load_remote_reward(spec, in_flight=1), load_remote_reward(spec, in_flight=2)

    def sequential(spent: list[float]) -> None:
        images = torch.cat(list(decoded_chunks(latents, args.chunk, decode_ms, spent)))
        one_at_a_time(images, labels)

    def overlapped(spent: list[float]) -> None:
        score_chunks([(url, in_flight)], decoded_chunks(latents, args.chunk, decode_ms, spent), labels)

    result = {"sequential": stage_times(sequential, args.repeats), "overlapped": stage_times(overlapped, args.repeats)}
    one_at_a_time.close()
    in_flight.close()
    return result


def throughput(url: str, args) -> dict[str, float]:
    """Images per second of ``classifier_prob`` in-process and through the server at ``url``."""
    images = torch.rand(args.images, 1, 8, 8)
    labels = torch.arange(args.images) % 10
    local = make_reward("classifier_prob", classifier=load_classifier())
    client = load_remote_reward(f"{url}?batch_size={args.batch}", in_flight=2)
    if not torch.equal(client(images, labels), local(images, labels)):
        print("note: the served scores differ from the in-process ones in the last bits (batching)")
    times = interleaved_times(
        {"in_process": lambda: local(images, labels), "remote": lambda: client(images, labels)}, args.repeats
    )
    client.close()
    return {name: args.images / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--images", type=int, default=160, help="images per epoch (the default run: 160)")
    parser.add_argument("--chunk", type=int, default=32, help="images per decoded chunk and per request")
    parser.add_argument("--batch", type=int, default=32, help="images per request in the throughput test")
    parser.add_argument("--model-ms", type=float, default=2.0, help="emulated model: ms per image on the server")
    parser.add_argument("--decode-ms", type=float, default=20.0, help="emulated decode: ms per chunk in the trainer")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    result: dict = {
        "images": args.images,
        "chunk": args.chunk,
        "batch": args.batch,
        "repeats": args.repeats,
        "model_ms_per_image": args.model_ms,
        "decode_ms_per_chunk": args.decode_ms,
    }
    server, url = start_server("classifier_prob", 0)
    try:
        result["images_per_s"] = throughput(url, args)
        result["digits_epoch_stage"] = epoch_stage(url, args, decode_ms=0.0)
    finally:
        server.kill()
        server.wait()
    server, url = start_server("remote_reward:emulated_model", args.model_ms)
    try:
        result["emulated_gpu_epoch_stage"] = epoch_stage(url, args, decode_ms=args.decode_ms)
    finally:
        server.kill()
        server.wait()

    ips = result["images_per_s"]
    print(
        f"classifier_prob, {args.images} images, {args.batch} per request: in-process {ips['in_process']:.0f} "
        f"images/s, through the server {ips['remote']:.0f} images/s (in-process / server: "
        f"{ips['in_process'] / ips['remote']:.1f}x)"
    )
    for key, label in (
        ("digits_epoch_stage", "digits classifier, real decode"),
        (
            "emulated_gpu_epoch_stage",
            f"emulated GPU: {args.model_ms:g} ms/image model, {args.decode_ms:g} ms/chunk decode",
        ),
    ):
        stage = result[key]
        print(f"reward stage of one epoch ({label}, {args.images} images in chunks of {args.chunk}):")
        for mode in ("sequential", "overlapped"):
            times = stage[mode]
            print(f"  {mode:<10}  wall {times['wall_ms']:7.1f} ms   trainer idle {times['idle_ms']:7.1f} ms")
    print(f"wrote {write_result('remote_reward', result, args.out)}")


if __name__ == "__main__":
    main()
