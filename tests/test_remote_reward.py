"""The reward server and the remote reward: exact scores, order, overlap, retries, bad inputs, resume after a
server that died mid-run."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

import flowdppo.rewards.remote as remote
from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.errors import ConfigError, RewardError
from flowdppo.prompts import PromptBatch
from flowdppo.rewards import load_user_reward
from flowdppo.rewards.remote import (
    PROTOCOL,
    RemoteSpec,
    decode_request,
    encode_request,
    encode_scores,
    load_remote_reward,
    parse_remote,
    score_chunks,
    with_retries,
)
from flowdppo.rewards.server import bind, make_app, resolve_reward, url_of
from flowdppo.runs import RunFolder
from flowdppo.trainer import train

TINY = ["prompts_per_epoch=2", "group_size=4", "eval_samples_per_class=2", "eval_every=100", "optim.minibatch_size=8"]
FAST_RETRIES = (0.05, 0.1, 0.2)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", FAST_RETRIES)


@contextmanager
def serving(app):
    """``app`` on a free loopback port, in a thread of this process: yields its URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the test server did not start"
        time.sleep(0.01)
    try:
        yield url_of(sock, "127.0.0.1")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def fake_app(score_fn):
    """A server speaking the protocol whose scores are ``score_fn(images, prompts)``, unchecked (a broken server)."""
    from fastapi import FastAPI, Request, Response
    from starlette.concurrency import run_in_threadpool

    app = FastAPI()

    @app.get("/health")
    def health():
        return {"reward": "fake", "protocol": PROTOCOL}

    @app.post("/score")
    async def score(request: Request):
        images, prompts, _ = decode_request(await request.body())
        scores = await run_in_threadpool(score_fn, images, prompts)
        return Response(encode_scores(scores), media_type="application/octet-stream")

    return app


def images_and_labels(n=8, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.arange(n) % 10


# The address and the protocol


def test_addresses_parse_with_their_options():
    assert parse_remote("http://127.0.0.1:8000") == RemoteSpec("http://127.0.0.1:8000", 32, 120.0)
    assert parse_remote("HTTPS://host/prefix/?batch_size=4&timeout=2.5") == RemoteSpec("https://host/prefix", 4, 2.5)


@pytest.mark.parametrize("name, message", [
    ("http://", r"not a reward server address"),
    ("http://host:port", r"not a reward server address .*Port could not be cast"),
    ("http://host:99999", r"not a reward server address .*out of range"),
    ("http://ho st:80", r"not a reward server address"),
    ("http://host:80?batch=3", r"unknown option 'batch'"),
    ("http://host:80?batch_size=0", r"batch_size must be a positive int, got '0'"),
    ("http://host:80?timeout=soon", r"timeout must be a positive float"),
])  # fmt: skip
def test_malformed_addresses_are_config_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        parse_remote(name)


def test_requests_carry_images_bit_for_bit_and_prompts_and_metadata():
    images = torch.rand(3, 3, 5, 5, dtype=torch.float32) * 1e-3 + 1 / 3  # values uint8 would round
    got, prompts, metadata = decode_request(encode_request(images, torch.tensor([1, 2, 3]), None))
    assert got.dtype == torch.float32 and torch.equal(got, images)
    assert torch.equal(prompts, torch.tensor([1, 2, 3])) and metadata is None
    got, prompts, metadata = decode_request(encode_request(images, ["a", "b", "c"], [{"x": 1}, {}, {"y": "z"}]))
    assert prompts == ["a", "b", "c"] and metadata == [{"x": 1}, {}, {"y": "z"}]
    with pytest.raises(ValueError, match="not a protocol-1 request"):
        decode_request(b"not safetensors")


# Scores through a server


def test_served_scores_equal_the_in_process_reward_exactly():
    reward = resolve_reward("classifier_prob", "cpu")
    images, labels = images_and_labels(8)
    with serving(make_app(reward, "classifier_prob")) as url:
        client = load_remote_reward(f"{url}?batch_size=4")
        assert client.served == "classifier_prob"
        assert torch.equal(client(images, labels), reward(images, labels))


def test_text_prompts_and_metadata_reach_the_served_reward(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    reward = load_user_reward("user_rewards:prompt_length")
    images = torch.rand(5, 3, 4, 4)
    texts, metadata = ["a cat", "a dog on a hill", "x", "yy", "zzz"], [{"k": i} for i in range(5)]
    with serving(make_app(reward, "user_rewards:prompt_length")) as url:
        got = load_remote_reward(f"{url}?batch_size=2")(images, texts, metadata)
    assert torch.equal(got, reward(images, texts, metadata))


def test_order_is_kept_when_later_requests_finish_first():
    active, most = [], []

    def slow_first(images, prompts):  # the first chunk takes longest: answers arrive out of order
        active.append(1)
        most.append(len(active))
        time.sleep(0.3 if int(prompts[0]) == 0 else 0.02)
        active.pop()
        return prompts.float()

    with serving(fake_app(slow_first)) as url:
        client = load_remote_reward(f"{url}?batch_size=2", in_flight=4)
        scores = client(torch.rand(8, 1, 8, 8), torch.arange(8))
    assert torch.equal(scores, torch.arange(8).float())
    assert max(most) >= 2  # requests were in flight together


def test_remote_chunks_are_sent_while_the_next_chunk_decodes():
    events = []

    class Recording:  # a remote-like reward: submit returns at once
        def submit(self, images, prompts, metadata=None):
            events.append(f"submit {int(prompts[0])}")
            return remote.PendingScores([_done(images.mean(dim=(1, 2, 3)))], images.device)

    def decoded(chunks):
        for k, chunk in enumerate(chunks):
            events.append(f"decode {2 * k}")
            yield chunk

    images, labels = images_and_labels(4)
    local = load_user_reward_in_tests("brightness")
    scores = score_chunks([("remote", Recording()), ("local", local)], decoded(images.split(2)), labels)
    assert events == ["decode 0", "submit 0", "decode 2", "submit 2"]
    expected = images.mean(dim=(1, 2, 3))
    assert torch.equal(scores, torch.stack([expected, expected], dim=1))


def test_text_prompts_are_sliced_with_their_chunks():
    seen = []

    class Recording:
        def submit(self, images, prompts, metadata=None):
            seen.append((list(prompts), list(metadata)))
            return remote.PendingScores([_done(torch.zeros(images.shape[0]))], images.device)

    prompts = PromptBatch(["a", "b", "c"], [{"i": 0}, {"i": 1}, {"i": 2}], torch.arange(3), {})
    score_chunks([("remote", Recording())], torch.rand(3, 3, 2, 2).split(2), prompts)
    assert seen == [(["a", "b"], [{"i": 0}, {"i": 1}]), (["c"], [{"i": 2}])]


def _done(value):
    from concurrent.futures import Future

    future = Future()
    future.set_result(value)
    return future


def load_user_reward_in_tests(name):
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        return load_user_reward(f"user_rewards:{name}")
    finally:
        sys.path.remove(str(Path(__file__).parent))


def test_a_request_without_answer_is_retried_with_backoff_then_one_error():
    calls = []

    def refused():
        calls.append(time.perf_counter())
        raise httpx.ConnectError("Connection refused")

    with pytest.raises(RewardError, match=r"reward server http://h:1: no answer after 4 tries \(ConnectError"):
        with_retries(refused, "http://h:1")
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert len(calls) == 4 and all(g >= d for g, d in zip(gaps, FAST_RETRIES, strict=True))


def test_a_reward_that_fails_on_the_server_is_one_error_without_retries(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    with serving(make_app(load_user_reward("user_rewards:two_scores_per_image"), "two")) as url:
        with pytest.raises(RewardError, match=r"HTTP 422 to /score: reward 'two' returned \(8, 2\)"):
            load_remote_reward(url)(*images_and_labels(8))


# Bad inputs: one line, exit code 2, nothing left


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_fails_in_one_line(tmp_path, capsys, reward_name, message):
    out = tmp_path / "out"
    args = ["train", "--no-progress", "--out", str(out), *TINY, "epochs=1", f"reward.names=[{reward_name}]"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("flowdppo: error: ") and re.search(message, err), err
    assert not out.exists()


def test_unreachable_server_at_start(tmp_path, capsys):
    port = free_port()
    train_fails_in_one_line(tmp_path, capsys, f"http://127.0.0.1:{port}",
                            rf"http://127.0.0.1:{port}: no answer after 4 tries \(ConnectError.*start it with: "
                            rf"flowdppo reward-server --reward NAME --port {port}")  # fmt: skip


def test_malformed_url(tmp_path, capsys):
    train_fails_in_one_line(tmp_path, capsys, "http://127.0.0.1:notaport", r"not a reward server address")


def test_server_returning_the_wrong_number_of_scores(tmp_path, capsys):
    with serving(fake_app(lambda images, prompts: torch.zeros(len(prompts) + 1))) as url:
        train_fails_in_one_line(tmp_path, capsys, url, rf"reward server {url} returned scores of shape \(9,\) for 8")


def test_server_returning_nan(tmp_path, capsys):
    with serving(fake_app(lambda images, prompts: torch.full((len(prompts),), float("nan")))) as url:
        train_fails_in_one_line(tmp_path, capsys, url, rf"{url} returned a non-finite score .* for 8 of 8 images")


def test_missing_serve_extra_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "httpx", None)
    train_fails_in_one_line(tmp_path, capsys, "http://127.0.0.1:1", r"pip install 'flowdppo\[serve\]'")
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["reward-server", "--reward", "ink"]) == 2
    assert "needs the serve extra: pip install 'flowdppo[serve]'" in capsys.readouterr().err


def test_server_port_in_use_and_unknown_reward_are_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["reward-server", "--reward", "ink", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--port: cannot listen on 127.0.0.1:{port}" in err, err
    assert main(["reward-server", "--reward", "sharpness", "--port", "0"]) == 2
    assert "--reward: unknown reward 'sharpness'" in capsys.readouterr().err


# A run on a server, and on a server that dies mid-run


def start_server(port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "flowdppo", "reward-server", "--reward", "classifier_prob",
                                "--port", str(port), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    line = process.stdout.readline()
    assert f"at http://127.0.0.1:{port} " in line, (line, process.stderr.read() if process.poll() is not None else "")
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


def rows_of(run_dir: Path, url: str = "") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k.replace(url, "classifier_prob") if url else k: v for k, v in r.items() if k != "time_s"} for r in rows]


EPOCHS = 3


@pytest.fixture(scope="module")
def in_process_rows(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("in_process") / "run"
    train(load_config(overrides=TINY + [f"epochs={EPOCHS}"]), run_dir, progress=False)
    return rows_of(run_dir)


@pytest.mark.slow  # the test below checks the same, and more, with a server that dies mid-run
def test_a_run_on_a_server_equals_the_run_in_process(in_process_rows, tmp_path):
    with serving(make_app(resolve_reward("classifier_prob", "cpu"), "classifier_prob")) as url:
        name = f"{url}?batch_size=4"
        train(load_config(overrides=TINY + [f"epochs={EPOCHS}", f"reward.names=['{name}']"]), tmp_path / "run",
              progress=False)  # fmt: skip
    assert rows_of(tmp_path / "run", name) == in_process_rows


def test_a_server_killed_mid_run_stops_resumably_and_resume_is_exact(in_process_rows, tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    """A server subprocess serves classifier_prob in chunks of 4; it is killed after epoch 0 is logged: epoch 1
    retries, stops in one line with exit code 2 and a checkpoint of its start; the server restarts on the same
    port and ``--resume`` finishes the run. Every row equals the run with the reward in-process."""
    port = free_port()
    url, run_dir = f"http://127.0.0.1:{port}", tmp_path / "run"
    name = f"{url}?batch_size=4"
    server = start_server(port)
    real_log = RunFolder.log

    def log_then_kill_after_epoch_0(self, row):
        real_log(self, row)
        if row["epoch"] == 0:
            stop(server)

    monkeypatch.setattr(RunFolder, "log", log_then_kill_after_epoch_0)
    try:
        args = ["train", "--no-progress", "--out", str(run_dir), *TINY, f"epochs={EPOCHS}", f"reward.names=['{name}']"]
        assert main(args) == 2
    finally:
        stop(server)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert re.search(rf"^flowdppo: error: reward server {url}: no answer after 4 tries .*; continue with: "
                     rf"flowdppo train --resume {run_dir}$", err), err  # fmt: skip
    assert (run_dir / "checkpoints" / "epoch_000001").is_dir()  # the start of the epoch that failed
    assert rows_of(run_dir, name) == in_process_rows[:1]

    monkeypatch.setattr(RunFolder, "log", real_log)
    server = start_server(port)  # the same address: the run's config names it
    try:
        assert main(["train", "--no-progress", "--resume", str(run_dir)]) == 0
    finally:
        stop(server)
    assert rows_of(run_dir, name) == in_process_rows
