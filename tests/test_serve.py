"""The OpenAI-compatible server (inference/server.py, ``python -m eval serve``) on localhost, driven
by the real ``openai`` client: completions and chat completions (greedy output equals ``eval
generate``), streaming, concurrent requests, stop strings, ``n`` with seeds, logprobs; bad input gets
OpenAI error objects and the server goes on; a full queue gets 429; a client leaving mid-stream frees
its KV blocks (seen through /metrics); SIGTERM finishes the requests in flight and exits 0.

One server in a thread of this process serves most tests (the shared tiny run with a chat template:
tests/conftest.py: chat_run); the SIGTERM test runs ``python -m eval serve`` itself.
"""

import concurrent.futures
import contextlib
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from cli import eval as eval_cli
from cli import serve as serve_cli
from inference.engine import Engine
from inference.load import load_run
from inference.server import MAX_BODY_BYTES, make_app, text_prompt_ids
from tests.helpers import run_in_process

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
MAX_BATCH, MAX_QUEUE, KV_BLOCKS, CHUNK = 4, 2, 17, 32  # the subprocess compiles the same programs
PROMPTS = ["the cat sat", "a dog bites", "hello world", "on the mat"]


class Served:
    """The in-process server: its URL, engine, tokenizer and an openai client."""

    def __init__(self, url: str, engine: Engine, tokenizer, run_dir: Path):
        self.url, self.engine, self.tokenizer, self.run_dir = url, engine, tokenizer, run_dir
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (with its labels, if any, as name{k=v})."""
        text = httpx2.get(f"{self.url}/metrics", timeout=10).text
        return {s.name + ("{" + ",".join(f"{k}={v}" for k, v in s.labels.items()) + "}" if s.labels
                          else ""): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def greedy(self, prompt: str, max_tokens: int, **kwargs):
        return self.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                              temperature=0, **kwargs)


def wait_for(predicate, timeout: float = 30.0, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def served(chat_run):
    run = load_run(chat_run[0])
    engine = Engine(run.cfg.model, run.params, run.mesh, run.rules, max_batch=MAX_BATCH,
                    num_blocks=KV_BLOCKS, prefill_chunk=CHUNK)
    engine.warm_up()
    server = uvicorn.Server(uvicorn.Config(make_app(engine, run.tokenizer, MODEL, max_queue=MAX_QUEUE),
                                           log_level="warning", access_log=False))
    sock = free_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the server to start")
    yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, run.tokenizer, chat_run[0])
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def sigterm_server(served):
    """``python -m eval serve`` started as soon as the in-process engine has compiled the same
    programs (the persistent compilation cache serves them), while the other tests run."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "eval", "serve", "--checkpoint", str(served.run_dir), "--port", "0",
         "--max-batch", "1", "--kv-blocks", str(KV_BLOCKS), "--prefill-chunk", str(CHUNK),
         "--model-name", MODEL, "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_greedy_completions_and_chat_equal_eval_generate(served, sigterm_server):
    out = served.greedy(PROMPTS[0], 8)
    generated = run_in_process(eval_cli.main, "generate", "--checkpoint", str(served.run_dir),
                               "--prompt", PROMPTS[0], "--temperature", "0", "--max-new-tokens", "8",
                               "--json")
    expected = json.loads(generated.stdout.strip().splitlines()[-1])
    assert out.choices[0].text == expected["completion"] and out.model == MODEL
    assert out.usage.prompt_tokens == len(text_prompt_ids(served.tokenizer, PROMPTS[0]))
    assert out.usage.completion_tokens == expected["tokens"]
    assert out.choices[0].finish_reason == ("stop" if expected["stopped"] else "length")

    chat = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "hi cat"}], max_tokens=8, temperature=0)
    generated = run_in_process(eval_cli.main, "generate", "--checkpoint", str(served.run_dir),
                               "--chat", "--system", "be brief", "--prompt", "hi cat",
                               "--temperature", "0", "--max-new-tokens", "8", "--json")
    expected = json.loads(generated.stdout.strip().splitlines()[-1])
    assert chat.choices[0].message.content == expected["completion"]
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    assert [m.id for m in served.client.models.list().data] == [MODEL]


def test_streamed_text_equals_the_whole_response(served):
    whole = served.greedy(PROMPTS[1], 10)
    chunks = list(served.greedy(PROMPTS[1], 10, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices

    messages = [{"role": "user", "content": "the cat"}]
    chat = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                 temperature=0)
    stream = list(served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                        temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_concurrent_requests_equal_sequential_ones(served):
    alone = [served.greedy(p, 12).choices[0].text for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: served.greedy(p, 12).choices[0].text, PROMPTS))
    assert together == alone


def test_stop_strings_end_the_text_before_them(served):
    full = served.greedy(PROMPTS[2], 16, stop=None).choices[0].text
    stop = full[4:7]
    assert len(stop) == 3, full
    cut = served.greedy(PROMPTS[2], 16, stop=[stop, "no such text"])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = served.greedy(PROMPTS[2], 16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert cut.usage.completion_tokens < 16


def test_n_choices_with_a_seed_are_reproducible(served):
    def sample(seed: int) -> list[str]:
        out = served.client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=8, n=2,
                                               temperature=1.0, top_p=0.95, seed=seed,
                                               extra_body={"top_k": 50})
        assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens <= 16
        return [c.text for c in out.choices]

    first = sample(5)
    assert first == sample(5) and first[0] != first[1] and first != sample(6)


def test_logprobs_in_the_openai_shapes(served):
    out = served.greedy(PROMPTS[0], 6, logprobs=3).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.text and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and logprob <= 0 and max(top.values()) == logprob  # greedy
        assert top[token] == logprob
    chat = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2).choices[0]
    content = chat.logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob == c.logprob and c.token == c.top_logprobs[0].token
               for c in content)


BAD = [  # (method, path, body, status, words in the message)
    ("POST", "/v1/completions", b"{", 400, "not valid JSON"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/v1/completions", b"\xff\xfe", 400, "not valid JSON"),
    ("POST", "/v1/completions", {"model": MODEL}, 400, "prompt must be"),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "'gpt-4' does not exist"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens must be an int"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 64}, 400, "more than the context window"),
    ("POST", "/v1/completions", b" " * (MAX_BODY_BYTES + 1), 413, "larger than"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature must be >= 0"),
    ("POST", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs must be in [0, 20]"),
    ("POST", "/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop must be"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 99}, 400, "more than this server runs"),
    ("POST", "/v1/completions", {"prompt": "x", "echo": True}, 400, "echo is not supported"),
    ("POST", "/v1/completions", {"prompt": [1, 999]}, 400, "prompt token ids must be in"),
    ("POST", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream must be a bool"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages must be a non-empty list"),
    ("POST", "/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "string role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "top_logprobs": 2}, 400, "needs logprobs: true"),
    ("GET", "/v1/completions", None, 405, "GET is not allowed"),
    ("POST", "/v1/nothing", {}, 404, "no such endpoint"),
]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(served):
    with httpx2.Client(base_url=served.url, timeout=30) as http:
        for method, path, body, status, words in BAD:
            content = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
            response = http.request(method, path, content=content)
            error = response.json()["error"]
            assert response.status_code == status and words in error["message"], (words, error)
            assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
    with pytest.raises(openai.BadRequestError, match="more than the context window of 64") as info:
        served.greedy("the cat sat on the mat " * 20, 4)
    assert info.value.code == "context_length_exceeded"
    assert served.greedy(PROMPTS[0], 4).choices[0].text == served.greedy(PROMPTS[0], 4).choices[0].text
    assert httpx2.get(f"{served.url}/health").json() == {"status": "ok"}
    assert served.metrics()["meshlm_http_responses_total{code=400}"] >= \
        sum(status == 400 for _, _, _, status, _ in BAD) + 1


def test_a_full_queue_gets_429_and_then_requests_succeed(served):
    capacity = MAX_BATCH + MAX_QUEUE
    served.engine.stop()  # nothing runs: the requests stay in the engine
    running = False
    try:
        with concurrent.futures.ThreadPoolExecutor(capacity) as pool:
            held = [pool.submit(served.greedy, p, 4) for p in (PROMPTS * 2)[:capacity]]
            wait_for(lambda: served.metrics()["meshlm_requests_in_flight"] == capacity,
                     what="the queue to fill")
            with pytest.raises(openai.RateLimitError, match="the server is busy"):
                served.greedy(PROMPTS[0], 4)
            assert served.metrics()["meshlm_queue_length"] == capacity
            served.engine.start()
            running = True
            texts = [f.result(timeout=60).choices[0].text for f in held]
    finally:
        if not running:
            served.engine.start()
    assert texts[:4] == [served.greedy(p, 4).choices[0].text for p in PROMPTS]


@contextlib.contextmanager
def stepped_by_hand_until_a_client_leaves(served) -> Iterator[dict]:
    """The engine's thread stopped while the body runs (the test steps it, so the request stays
    until its client has gone), yielding the metrics before; on leaving, the server has counted
    one more disconnect, and the thread runs again."""
    before = served.metrics()
    served.engine.stop()
    try:
        yield before
        wait_for(lambda: served.metrics()["meshlm_client_disconnects_total"] ==
                 before["meshlm_client_disconnects_total"] + 1, what="the disconnect")
    finally:
        served.engine.start()


def test_a_client_leaving_mid_stream_frees_its_blocks(served):
    with stepped_by_hand_until_a_client_leaves(served) as before:
        stream = served.greedy(PROMPTS[3], 50, stream=True)  # returns with the response's headers
        served.engine.step(), served.engine.step()  # its prompt, then a token
        first = next(iter(stream))
        assert first.choices[0].text and first.choices[0].finish_reason is None
        assert served.metrics()["meshlm_kv_blocks_in_use"] > 0
        stream.close()
    wait_for(lambda: served.metrics()["meshlm_kv_blocks_in_use"] == 0, what="the blocks to be freed")
    after = served.metrics()
    assert after["meshlm_running_sequences"] == 0 and after["meshlm_requests_in_flight"] == 0
    assert after["meshlm_requests_finished_total{reason=cancelled}"] == \
        before.get("meshlm_requests_finished_total{reason=cancelled}", 0) + 1
    assert after["meshlm_generated_tokens_total"] < before["meshlm_generated_tokens_total"] + 50
    assert after["meshlm_time_to_first_token_seconds_count"] > 0


def test_a_client_leaving_before_its_response_frees_its_blocks(served):
    """A non-streamed request from a raw socket, closed while its sequence holds blocks; the test
    steps the engine itself, so nothing finishes by chance first."""
    with stepped_by_hand_until_a_client_leaves(served):
        body = json.dumps({"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 40}).encode()
        client = socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1])))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: served.metrics()["meshlm_requests_in_flight"] == 1, what="the request")
        served.engine.step()  # admitted: its blocks are taken, its prompt prefilled
        positions = len(text_prompt_ids(served.tokenizer, PROMPTS[0])) + 40 - 1
        assert served.metrics()["meshlm_kv_blocks_in_use"] == math.ceil(positions / 16)
        client.close()
    wait_for(lambda: served.metrics()["meshlm_requests_in_flight"] == 0, what="the cancel")
    assert served.metrics()["meshlm_kv_blocks_in_use"] == 0


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(served, sigterm_server):
    proc = sigterm_server
    line = proc.stdout.readline()
    assert line.startswith(f"serving {MODEL} on http://"), line + proc.stderr.read()
    url = line.split()[-1]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    kwargs = {"model": MODEL, "max_tokens": 60, "temperature": 0}  # about 0.4 s each
    stream = client.completions.create(prompt=PROMPTS[0], stream=True, **kwargs)
    chunks = [next(iter(stream))]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # max-batch 1: this one waits
        waiting = pool.submit(client.completions.create, prompt=PROMPTS[1], **kwargs)
        wait_for(lambda: "meshlm_queue_length 1.0" in httpx2.get(f"{url}/metrics").text,
                 what="the second request to queue")
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        second = waiting.result(timeout=60)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert second.choices[0].finish_reason in ("length", "stop")
    assert second.choices[0].text == served.greedy(PROMPTS[1], 60).choices[0].text
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{url}/health")


def test_a_shutdown_timeout_cancels_the_requests_still_running(served):
    """``--shutdown-timeout 0.5`` as ``eval serve`` configures uvicorn, for a second app over the
    engine (lifespan off: the shared engine's thread stays stopped, so a request there never
    ends); asked to exit, the server waits 0.5 s, cancels it (the client gets uvicorn's 500) and
    exits; the engine drops the request at its next step. (Its last event then goes to the second
    server's closed event loop: ``Handle.emit`` logs that and goes on.)"""
    parse = serve_cli.build_parser().parse_args
    assert serve_cli.uvicorn_config(None, parse(["--checkpoint", "x"])).timeout_graceful_shutdown is None
    args = parse(["--checkpoint", "x", "--shutdown-timeout", "0.5", "--log-level", "warning"])
    served.engine.stop()
    waiting = served.engine.stats().waiting
    try:
        server = uvicorn.Server(serve_cli.uvicorn_config(
            make_app(served.engine, served.tokenizer, MODEL), args, lifespan="off"))
        assert server.config.timeout_graceful_shutdown == 0.5
        sock = free_socket()
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        wait_for(lambda: server.started, what="the second server to start")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                               api_key="unused", max_retries=0, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(client.completions.create, model=MODEL, prompt=PROMPTS[0], max_tokens=4)
            wait_for(lambda: served.engine.stats().waiting == waiting + 1, what="the request to queue")
            started = time.monotonic()
            server.should_exit = True
            thread.join(timeout=30)
            assert not thread.is_alive() and time.monotonic() - started < 10
            with pytest.raises(openai.InternalServerError):
                held.result(timeout=30)
    finally:
        served.engine.start()
    wait_for(lambda: served.engine.stats().waiting == waiting, what="the cancelled request to go")
    assert served.metrics()["meshlm_kv_blocks_in_use"] == 0


def test_serve_mistakes_are_one_line_errors(served):
    taken = free_socket()
    taken.listen()
    port = str(taken.getsockname()[1])
    run_dir = str(served.run_dir)
    for args, words in [(["--checkpoint", "/nonexistent/run"], "/nonexistent/run"),
                        (["--checkpoint", run_dir, "--port", "70000"], "--port must be in"),
                        (["--checkpoint", run_dir, "--max-batch", "0"], "--max-batch must be >= 1"),
                        (["--checkpoint", run_dir, "--shutdown-timeout", "-1"],
                         "--shutdown-timeout must be >= 0"),
                        (["--checkpoint", run_dir, "--shutdown-timeout", "nan"],
                         "--shutdown-timeout must be >= 0"),
                        (["--checkpoint", run_dir, "--max-seq-len", "40"], "a multiple of --block-size"),
                        (["--checkpoint", run_dir, "--port", port], "cannot listen on"),
                        (["--checkpoint", run_dir, "--bogus"], "unrecognized arguments")]:
        result = run_in_process(eval_cli.main, "serve", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], (args, lines)
    taken.close()
