"""The reward server and the remote reward: exact scores, order, overlap, retries, bad inputs, resume after a
server that died mid-run; a token, bounded requests, malformed requests, a total deadline, Ctrl-C, proxies."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch
import uvicorn

import flowdppo.rewards.remote as remote
from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.errors import ConfigError, RewardError
from flowdppo.prompts import PromptBatch
from flowdppo.rewards import load_user_reward, score_chunks
from flowdppo.rewards.registry import RewardContext, load_rewards
from flowdppo.rewards.remote import (
    PROTOCOL,
    RemoteSpec,
    decode_request,
    encode_request,
    encode_scores,
    load_remote_reward,
    parse_remote,
    with_retries,
)
from flowdppo.rewards.server import (
    DEFAULT_MAX_CONNECTIONS,
    bind,
    exposure_warning,
    make_app,
    resolve_reward,
    server_config,
    server_token,
    url_of,
)
from flowdppo.rewards.wire import TOKEN_ENV, RequestError
from flowdppo.runs import RunFolder
from flowdppo.trainer import train

TINY = ["prompts_per_epoch=2", "group_size=4", "eval_samples_per_class=2", "eval_every=100", "optim.minibatch_size=8"]
FAST_RETRIES = (0.05, 0.1, 0.2)


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def fast_retries_and_a_clean_environment(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", FAST_RETRIES)
    for name in (TOKEN_ENV, *PROXY_VARIABLES, *(v.lower() for v in PROXY_VARIABLES)):
        monkeypatch.delenv(name, raising=False)


@contextmanager
def serving(app):
    """``app`` on a free loopback port, in a thread of this process: yields its URL."""
    with serving_with_server(app) as (url, _):
        yield url


@contextmanager
def serving_with_server(app, max_connections: int = DEFAULT_MAX_CONNECTIONS):
    """``serving``, yielding the URL and the ``uvicorn.Server`` (whose ``server_state.tasks`` are the requests
    still being answered), with the reward server's own uvicorn settings."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, max_connections))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the test server did not start"
        time.sleep(0.01)
    try:
        yield url_of(sock, "127.0.0.1"), server
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
    spec = parse_remote("http://127.0.0.1:8000?token=s3cret")
    assert spec.token == "s3cret" and "s3cret" not in repr(spec)


@pytest.mark.parametrize(
    "name, message",
    [
        ("http://", r"not a reward server address"),
        ("http://host:port", r"not a reward server address .*Port could not be cast"),
        ("http://host:99999", r"not a reward server address .*out of range"),
        ("http://ho st:80", r"not a reward server address"),
        ("http://host:80?batch=3", r"unknown option 'batch'"),
        ("http://host:80?batch_size=0", r"batch_size must be a positive int, got '0'"),
        ("http://host:80?timeout=soon", r"timeout must be a positive float"),
        ("http://host:80?timeout=inf", r"timeout must be a positive float, got 'inf'"),
        ("http://host:80?token=", r"token: a token is one or more printable ASCII characters"),
        ("http://host:80?token=a b&batch=1", r"'http://host:80\?token=\*\*\*&batch=1'.*unknown option 'batch'"),
    ],
)
def test_malformed_addresses_are_config_errors(name, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse_remote(name)
    assert "a b" not in str(caught.value)  # a token is never repeated in a message


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

    async def refused():
        calls.append(time.perf_counter())
        raise httpx.ConnectError("Connection refused")

    with pytest.raises(RewardError, match=r"reward server http://h:1: no answer after 4 tries \(ConnectError"):
        asyncio.run(with_retries(refused, "http://h:1"))
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
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(line for line in lines if not line.startswith("flowdppo reward-server: "))  # a server in-process
    assert err.count("\n") == 0 and err.startswith("flowdppo: error: ") and re.search(message, err), err
    assert not out.exists()
    return err


def test_unreachable_server_at_start(tmp_path, capsys):
    port = free_port()
    train_fails_in_one_line(
        tmp_path,
        capsys,
        f"http://127.0.0.1:{port}",
        rf"http://127.0.0.1:{port}: no answer after 4 tries \(ConnectError.*start it with: "
        rf"flowdppo reward-server --reward NAME --port {port}",
    )


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
    assert main(["reward-server", "--reward", "ink", "--port", "0", "--max-connections", "0"]) == 2
    assert "--max-connections: must be at least 1, got 0" in capsys.readouterr().err


def test_a_connection_over_max_connections_gets_503_and_the_trainer_retries_it():
    """Two requests held on a server answering 2 at once: a third is HTTP 503, a client retries it and then says
    the server is full; once the two are answered, the client is served."""
    held, release = threading.Semaphore(0), threading.Event()

    def hold(images, prompts):
        held.release()
        assert release.wait(30)
        return prompts.float()

    def post(url, answers):
        with httpx.Client(trust_env=False, timeout=30) as http:
            answers.append(http.post(f"{url}/score", content=encode_request(*images_and_labels(2), None)).status_code)

    with serving_with_server(fake_app(hold), max_connections=2) as (url, server):
        answers = []
        threads = [threading.Thread(target=post, args=(url, answers)) for _ in range(2)]
        for thread in threads:
            thread.start()
        assert held.acquire(timeout=30) and held.acquire(timeout=30)  # both are being scored
        with httpx.Client(trust_env=False, timeout=10) as http:
            assert http.get(f"{url}/health").status_code == 503
        with pytest.raises(RewardError, match=r"no answer after 4 tries .*HTTP 503 .*--max-connections"):
            load_remote_reward(url)
        release.set()
        for thread in threads:
            thread.join(30)
        assert answers == [200, 200]
        client = load_remote_reward(f"{url}?batch_size=4")
        assert torch.equal(client(torch.rand(8, 1, 8, 8), torch.arange(8)), torch.arange(8).float())


# A run on a server, and on a server that dies mid-run


def start_server(port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowdppo",
            "reward-server",
            "--reward",
            "classifier_prob",
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    assert f"at http://127.0.0.1:{port} " in line, (line, process.stderr.read() if process.poll() is not None else "")
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


def rows_of(run_dir: Path, remote_name: str = "") -> list[dict]:
    """The run's metric rows without their times; ``remote_name`` (``remote:classifier_prob``) renamed as the
    reward is named in-process, so the rows of a run on a server can equal those of a run in-process."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k.replace(remote_name, "classifier_prob") if remote_name else k: v for k, v in r.items() if k != "time_s"}
        for r in rows
    ]


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
        train(
            load_config(overrides=TINY + [f"epochs={EPOCHS}", f"reward.names=['{name}']"]),
            tmp_path / "run",
            progress=False,
        )
    assert rows_of(tmp_path / "run", "remote:classifier_prob") == in_process_rows


def test_a_server_killed_mid_run_stops_resumably_and_resume_is_exact(in_process_rows, tmp_path, capsys, monkeypatch):
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
    assert re.search(
        rf"^flowdppo: error: reward server {url}: no answer after 4 tries .*; continue with: "
        rf"flowdppo train --resume {run_dir}$",
        err,
    ), err
    assert (run_dir / "checkpoints" / "epoch_000001").is_dir()  # the start of the epoch that failed
    assert "reward/remote:classifier_prob" in rows_of(run_dir)[0]  # named by the reward served, not the port
    assert rows_of(run_dir, "remote:classifier_prob") == in_process_rows[:1]

    monkeypatch.setattr(RunFolder, "log", real_log)
    server = start_server(port)  # the same address: the run's config names it
    try:
        assert main(["train", "--no-progress", "--resume", str(run_dir)]) == 0
    finally:
        stop(server)
    assert rows_of(run_dir, "remote:classifier_prob") == in_process_rows


# A token, bounded requests and malformed requests: each answered 4xx in one line, the server still serving

TOKEN = "s3cret-Token_1"
OCTETS = {"content-type": "application/octet-stream"}


def with_header(body: bytes, change) -> bytes:
    """``body`` (a safetensors request) with its header JSON changed in place by ``change(header)``."""
    size = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + size])
    change(header)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body[8 + size :]


def labelled(n=2):
    return encode_request(*images_and_labels(n), None)


def texts(n=2):
    return encode_request(images_and_labels(n)[0], ["a"] * n, None)


def set_meta(**entries):
    return lambda h: h["__metadata__"].update(entries)


def set_images(**fields):
    return lambda h: h["images"].update(fields)


MALFORMED = [  # (body, status, message): what an attacker or a broken client sends
    (b"", 400, r"header length is missing"),
    (b"not safetensors", 400, r"not a protocol-1 request"),
    ((2**63).to_bytes(8, "little") + b"{}", 400, r"header length is missing or past the body's end"),
    ((5).to_bytes(8, "little") + b"[1,2]", 400, r"header is not a JSON object"),
    (with_header(labelled(), lambda h: h.update({"__metadata__": {"protocol": 1}})), 400, r"object of strings"),
    (with_header(texts(), set_meta(prompts="5")), 422, r"'prompts' must be a JSON list of strings, got int"),
    (with_header(texts(), set_meta(prompts="null")), 422, r"'prompts' must be a JSON list of strings, got NoneType"),
    (with_header(texts(), set_meta(prompts="[" * 100_000)), 422, r"header entry 'prompts' is not JSON"),
    (with_header(texts(), set_meta(prompts='["a"]')), 422, r"2 images but 1 prompts"),
    (with_header(texts(), lambda h: h["__metadata__"].pop("prompts")), 422, r"no prompts"),
    (with_header(labelled(), set_meta(metadata="{}")), 422, r"'metadata' must be null or a JSON list of 2 objects"),
    (with_header(labelled(), set_meta(protocol="2")), 422, r"protocol '2'; this server speaks protocol 1"),
    (with_header(labelled(), set_images(shape=[], data_offsets=[0, 4])), 422, r"images have shape \(\)"),
    (with_header(labelled(), set_images(dtype="I64", shape=[2, 1, 4, 4])), 422, r"images have dtype 'I64'"),
    (with_header(labelled(), set_images(shape=[10**9, 1, 8, 8])), 413, r"10+ images .* --max-images 16"),
    (with_header(labelled(), set_images(shape=[4, 1, 8, 8])), 400, r"does not match its data bytes"),
    (with_header(labelled(), set_images(shape="big")), 400, r"tensor 'images' has no valid shape and dtype"),
    (with_header(labelled(), lambda h: h.update(weights=h.pop("prompts"))), 422, r"unknown tensor 'weights'"),
    (with_header(labelled(), lambda h: h["prompts"].update(dtype="F64")), 422, r"tensor 'prompts' is F64 \(2,\)"),
    (with_header(labelled(), lambda h: h.pop("images")), 422, r"no tensor 'images'"),
]


@pytest.mark.parametrize("body, status, message", MALFORMED)
def test_malformed_requests_are_refused_from_their_header(body, status, message):
    with pytest.raises(RequestError, match=message) as caught:
        decode_request(body, max_images=16)
    assert caught.value.status == status


def raw_post(url: str, head: str, body: bytes = b"") -> tuple[int, dict]:
    """A POST /score written by hand (``head``: header lines), its status and JSON answer; the socket times out
    after 10 s, so a server that waited for the rest of the body fails the test instead of hanging it."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST /score HTTP/1.1\r\nhost: {host}\r\n{head}\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head_bytes, _, answer = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head_bytes).group(1))
        while len(answer) < length:
            answer += sock.recv(65536)
    return int(head_bytes.split()[1]), json.loads(answer)


def test_bad_requests_get_4xx_and_one_line_each_and_the_server_keeps_serving(capfd, monkeypatch):
    """With a token, 16 images and 256 KiB at most: requests without the token, with a wrong one, of the wrong
    kind, too large (declared, chunked, by their images), malformed or cut short; then a good one is scored
    exactly."""
    reward = resolve_reward("classifier_prob", "cpu")
    app = make_app(reward, "classifier_prob", token=TOKEN, max_images=16, max_body_bytes=256 * 1024)
    auth = {"authorization": f"Bearer {TOKEN}"}
    with serving_with_server(app) as (url, server), httpx.Client(trust_env=False, timeout=10) as http:
        capfd.readouterr()
        sent = [
            (http.get(f"{url}/health"), 401, r"no token \(this server needs Authorization: Bearer TOKEN"),
            (http.post(f"{url}/score", content=labelled(), headers=OCTETS), 401, r"no token"),
            (
                http.post(f"{url}/score", content=labelled(), headers={**OCTETS, "authorization": "Bearer nope"}),
                401,
                r"wrong token",
            ),
            (
                http.post(f"{url}/score", content=labelled(), headers={**OCTETS, "authorization": f"Basic {TOKEN}"}),
                401,
                r"no token",
            ),
            (
                http.post(f"{url}/score", json={"images": [1]}, headers=auth),
                415,
                r"'application/json'; send the "
                r"safetensors body as application/octet-stream",
            ),
            (
                http.post(f"{url}/score", content=iter([b"x" * 65536] * 5), headers={**OCTETS, **auth}),
                413,
                r"body over the server's --max-body-mb 0.25",
            ),  # chunked, no Content-Length
            (
                http.post(
                    f"{url}/score", content=encode_request(*images_and_labels(17), None), headers={**OCTETS, **auth}
                ),
                413,
                r"17 images in one request, over the server's --max-images "
                r"16",
            ),
            *[
                (http.post(f"{url}/score", content=body, headers={**OCTETS, **auth}), status, message)
                for body, status, message in MALFORMED
            ],
        ]
        for response, status, message in sent:
            assert response.status_code == status and re.search(message, response.json()["detail"]), response.text
        assert sent[0][0].headers["www-authenticate"] == "Bearer"
        # a declared body of 1 TB, and none sent: refused before a byte is read
        head = (
            f"authorization: Bearer {TOKEN}\r\ncontent-type: application/octet-stream\r\ncontent-length: {10**12}\r\n"
        )
        refused = "request body over the server's --max-body-mb 0.25; send fewer images per request"
        assert raw_post(url, head) == (413, {"detail": f"{refused} (batch_size in the address)"})
        partial = f"POST /score HTTP/1.1\r\nhost: x\r\n{head.replace(str(10**12), '1000')}\r\n".encode() + b"x" * 10
        with socket.create_connection((urlsplit(url).hostname, urlsplit(url).port), timeout=10) as sock:
            sock.sendall(partial)  # 10 of 1000 bytes, then the end of the stream
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # until the server has seen the client gone and closed its side
                pass
        for _ in range(200):  # then until it has answered (and logged) it: capfd is read once, as reading it
            if not server.server_state.tasks:  # while another thread writes may lose what that thread wrote
                break
            time.sleep(0.05)
        err = capfd.readouterr().err
        assert "HTTP 400 to POST /score from 127.0.0.1: the client disconnected after 10 bytes of its body" in err
        lines = err.splitlines()
        assert len(lines) == len(sent) + 2 and "Traceback" not in err, err  # + the 1 TB one and the one gone
        assert all(
            re.match(r"flowdppo reward-server: HTTP 4\d\d to (GET|POST) /\w+ from 127\.0\.0\.1: ", line)
            for line in lines
        ), err
        assert TOKEN not in err
        monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the trainer's side: the same variable
        images, labels = images_and_labels(8)
        assert torch.equal(load_remote_reward(url)(images, labels), reward(images, labels))


def test_a_token_in_the_address_is_sent_and_a_missing_one_is_one_line(tmp_path, capsys):
    reward = resolve_reward("classifier_prob", "cpu")
    with serving(make_app(reward, "classifier_prob", token=TOKEN)) as url:
        images, labels = images_and_labels(4)
        assert torch.equal(load_remote_reward(f"{url}?token={TOKEN}")(images, labels), reward(images, labels))
        train_fails_in_one_line(
            tmp_path,
            capsys,
            url,
            rf"reward server {url}: HTTP 401 to /health: no token \(.*\); "
            rf"give the trainer the server's token in {TOKEN_ENV} \(or token=\.\.\. in the "
            r"address\)$",
        )
        train_fails_in_one_line(tmp_path, capsys, f"'{url}?token=wrong'", r"HTTP 401 to /health: wrong token")


def test_the_server_warns_beyond_loopback_without_a_token_and_reads_its_token(monkeypatch, capsys):
    warning = exposure_warning("0.0.0.0", None)
    assert "listening on 0.0.0.0 without a token" in warning and f"set {TOKEN_ENV} (or --token)" in warning
    assert exposure_warning("::", None) and not exposure_warning("0.0.0.0", TOKEN)
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert server_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert server_token(None) == TOKEN and server_token("other") == "other"
    for args, message in (
        (["--token", ""], "--token: a token is one or more printable ASCII characters"),
        (["--max-images", "0"], "--max-images: must be at least 1, got 0"),
        (["--max-body-mb", "-1"], "--max-body-mb: must be a positive number of MB"),
    ):
        assert main(["reward-server", "--reward", "ink", "--port", "0", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err


def test_requests_fit_the_servers_limits_or_say_which_option_to_change(tmp_path, capsys):
    sizes = []

    def recording(images, prompts):
        sizes.append(len(prompts))
        return prompts.float()

    app = fake_app(recording)
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/health"]

    @app.get("/health")
    def health():
        return {"reward": "fake", "protocol": PROTOCOL, "max_images": 3, "max_body_bytes": 2000}

    with serving(app) as url:
        scores = load_remote_reward(url)(torch.rand(8, 1, 8, 8), torch.arange(8))  # batch_size 32, capped at 3
        assert torch.equal(scores, torch.arange(8).float()) and sizes == [3, 3, 2]
        too_big = rf"^reward server {url}: a request of 3 images is 0.00\d+ MB, over the server's --max-body-mb 0.00191"
        with pytest.raises(RewardError, match=rf"{too_big}; lower batch_size in the address to 1$"):
            load_remote_reward(url)(torch.rand(3, 2, 12, 12), torch.arange(3))  # 1152 bytes an image
        with pytest.raises(RewardError, match=r"restart the server with more --max-body-mb$"):
            load_remote_reward(url)(torch.rand(1, 3, 32, 32), torch.arange(1))


# The client: a total deadline, Ctrl-C, proxies, names


def trickling_app(route: str, seconds: float = 20.0):
    """A server whose ``route`` answers one byte every 0.2 s for ``seconds`` (the other route answers normally)."""
    from fastapi.responses import StreamingResponse

    app = fake_app(lambda images, prompts: prompts.float())

    async def trickle(request):
        async def one_byte_at_a_time():
            for _ in range(int(seconds / 0.2)):
                yield b" "
                await asyncio.sleep(0.2)

        return StreamingResponse(one_byte_at_a_time(), media_type="application/json")

    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != route]
    app.add_route(route, trickle, methods=["GET" if route == "/health" else "POST"])
    return app


def test_a_trickling_answer_fails_at_the_deadline_not_per_read():
    with serving(trickling_app("/score")) as url:
        reward = load_remote_reward(f"{url}?timeout=1")
        start = time.perf_counter()
        with pytest.raises(
            RewardError,
            match=rf"^reward server {url}: no complete answer to /score within 1 s; .* "
            r"timeout=SECONDS in the address",
        ):
            reward(*images_and_labels(4))
        assert time.perf_counter() - start < 3  # tries are not repeated: the server is still busy with it


@pytest.mark.parametrize("route", ["/health", "/score"])
def test_a_trickling_server_is_one_line_naming_the_timeout(tmp_path, capsys, route):
    with serving(trickling_app(route)) as url:
        train_fails_in_one_line(
            tmp_path,
            capsys,
            f"'{url}?timeout=1'",
            rf"reward server {url}: no complete answer to {route} within 1 s; if the server is "
            rf"only slow, give it longer with timeout=SECONDS in the address",
        )


def test_ctrl_c_while_a_request_hangs_exits_130_at_once(tmp_path):
    """A trainer subprocess whose /score request gets no answer for 60 s is sent SIGINT: one line at once and exit
    code 130 long before the answer (the requests in flight do not hold the process; what remains is the
    interpreter's own shutdown, a few seconds on a loaded machine)."""
    from fastapi import FastAPI

    arrived, release = threading.Event(), threading.Event()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"reward": "hang", "protocol": PROTOCOL}

    @app.post("/score")
    async def hang():
        arrived.set()
        for _ in range(1200):  # 60 s at most
            if release.is_set():
                break
            await asyncio.sleep(0.05)
        return {}

    with serving(app) as url:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flowdppo",
                "train",
                "--no-progress",
                "--out",
                str(tmp_path / "run"),
                *TINY,
                "epochs=1",
                f"reward.names=[{url}]",
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert arrived.wait(120), "the trainer sent no request"
            process.send_signal(signal.SIGINT)
            start = time.perf_counter()
            line = process.stderr.readline()  # the process prints it, or exits (EOF)
            said = time.perf_counter() - start
            code = process.wait(30)
            waited = time.perf_counter() - start
        finally:
            release.set()
            stop(process)
        rest = process.stderr.read()
    assert line.startswith("flowdppo: interrupted (SIGINT)") and said < 2, (line, said, rest)
    assert code == 130 and waited < 20 and not rest.strip(), (code, waited, rest)


def test_loopback_bypasses_proxies_and_a_failure_through_a_proxy_names_it(tmp_path, capsys, monkeypatch):
    """Every proxy variable points at a closed port of 127.0.0.1: a loopback server is still reached directly; a
    server by name (never contacted: only the proxy is) fails in one line naming the proxy, without its password."""
    shown = f"http://127.0.0.1:{free_port()}"
    for name in PROXY_VARIABLES[:3]:
        monkeypatch.setenv(name, shown.replace("://", "://user:pw@"))
    reward = resolve_reward("classifier_prob", "cpu")
    with serving(make_app(reward, "classifier_prob")) as url:
        images, labels = images_and_labels(4)
        assert torch.equal(load_remote_reward(url)(images, labels), reward(images, labels))
    assert remote.proxy_of("http://reward-box.invalid:8000") == shown
    err = train_fails_in_one_line(
        tmp_path,
        capsys,
        "http://reward-box.invalid:8000",
        rf"no answer after 4 tries \(ConnectError.*\) through the proxy {shown} \(from "
        r"HTTP_PROXY / HTTPS_PROXY / ALL_PROXY; add the host to NO_PROXY",
    )
    assert "pw" not in err
    monkeypatch.setenv("NO_PROXY", "reward-box.invalid")
    assert remote.proxy_of("http://reward-box.invalid:8000") is None


def test_remote_rewards_are_named_by_the_reward_served_whatever_the_port():
    reward = resolve_reward("classifier_prob", "cpu")
    with serving(make_app(reward, "classifier_prob")) as first, serving(make_app(reward, "classifier_prob")) as second:
        assert first != second
        assert [name for name, _ in load_rewards([first], ("digits",), RewardContext())] == ["remote:classifier_prob"]
        with pytest.raises(
            ConfigError,
            match=rf"reward.names: '{first}' and '{second}' are both the reward "
            r"'remote:classifier_prob'; give each reward once",
        ):
            load_rewards([first, second], ("digits",), RewardContext())
