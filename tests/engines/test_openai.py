"""Unit tests of OpenAIEngine's HTTP client logic against a scripted local HTTP server.

The server is a real stdlib HTTP server on 127.0.0.1 that answers from a script (429, 503,
400, dropped connections, slow replies), so retries, backoff, errors, concurrency and
response parsing are exercised over real sockets. The real-vLLM tests are in
test_openai_vllm.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from gristmill.engines.base import Completion, Engine, Sampling, ServerError, is_transient
from gristmill.engines.openai import (
    Backoff,
    OpenAIEngine,
    finish_reason,
    parse_completions,
    parse_retry_after,
)

FAST = Backoff(base_s=0.01, max_s=0.05)


@dataclass
class Reply:
    """One scripted answer: a status and JSON body, or a dropped connection, after a delay."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


@dataclass
class Seen:
    """One request the server received."""

    method: str
    path: str
    payload: Any
    headers: dict[str, str]


class Script:
    """Scripted replies per path (used first), then `default(path, payload)`; logs requests."""

    def __init__(self) -> None:
        self.queued: dict[str, list[Reply]] = {}
        self.seen: list[Seen] = []
        self.default: Callable[[str, Any], Reply] = lambda path, payload: Reply(
            status=404, body={"error": {"message": f"no route {path}"}}
        )
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""

    def queue(self, path: str, *replies: Reply) -> None:
        self.queued.setdefault(path, []).extend(replies)

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    def answer(self, seen: Seen) -> Reply:
        with self.lock:
            self.seen.append(seen)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            pending = self.queued.get(seen.path)
            if pending:
                return pending.pop(0)
        return self.default(seen.path, seen.payload)

    def done(self) -> None:
        with self.lock:
            self.in_flight -= 1


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            seen = Seen(
                method=self.command,
                path=self.path,
                payload=json.loads(raw) if raw else None,
                headers={k.lower(): v for k, v in self.headers.items()},
            )
            reply = script.answer(seen)
            try:
                time.sleep(reply.delay)
                if reply.drop:  # close the socket without a response
                    self.close_connection = True
                    return
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on a slow reply: expected in timeout tests
            finally:
                script.done()

        do_GET = _serve
        do_POST = _serve

        def log_message(self, fmt: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def script() -> Iterator[Script]:
    """A scripted HTTP server on a free 127.0.0.1 port, stopped after the test."""
    script = Script()
    script.default = completion_reply
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    server.daemon_threads = True
    script.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield script
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def completion_body(text: str, *, n: int = 1, prompt_tokens: int = 4) -> dict[str, Any]:
    """An OpenAI-style completions response with n choices (no token ids)."""
    return {
        "choices": [
            {"index": i, "text": f"{text}#{i}", "finish_reason": "length"} for i in range(n)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3 * n},
    }


def completion_reply(path: str, payload: Any) -> Reply:
    """Default reply: a completion echoing the prompt (and 404 for other paths)."""
    if path != "/v1/completions":
        return Reply(status=404, body={"error": {"message": f"no route {path}"}})
    return Reply(body=completion_body(f"re:{payload['prompt']}", n=payload.get("n", 1)))


def engine(script: Script, **kwargs: Any) -> OpenAIEngine:
    options: dict[str, Any] = {"base_url": script.url, "backoff": FAST, **kwargs}
    return OpenAIEngine("m", **options)


def busy(status: int, message: str, **headers: str) -> Reply:
    return Reply(status=status, body={"error": {"message": message}}, headers=headers)


# ---- retries, backoff, errors ---------------------------------------------------------


def test_retries_429_and_503_then_succeeds_honouring_retry_after(script: Script) -> None:
    script.queue(
        "/v1/completions",
        busy(429, "slow down", **{"Retry-After": "1"}),
        busy(503, "warming up"),
    )
    start = time.perf_counter()
    out = engine(script).generate(["hi"], Sampling(max_tokens=3))
    elapsed = time.perf_counter() - start
    assert out == [[Completion("re:hi#0", "length", prompt_tokens=4, output_tokens=3)]]
    assert len(script.requests_to("/v1/completions")) == 3
    assert elapsed >= 1.0  # the Retry-After of 1 s was honoured, not the 10 ms backoff


def test_retries_dropped_connection_and_read_timeout(script: Script) -> None:
    script.queue("/v1/completions", Reply(drop=True), Reply(delay=1.5), Reply(drop=True))
    out = engine(script, timeout_s=0.4).generate(["x"], Sampling())
    assert out[0][0].text == "re:x#0"
    assert len(script.requests_to("/v1/completions")) == 4


def test_client_error_fails_at_once_with_status_message_and_kind(script: Script) -> None:
    script.queue("/v1/completions", busy(400, "max_tokens=5000 is more than max_model_len"))
    with pytest.raises(ServerError) as info:
        engine(script).generate(["x"], Sampling())
    message = str(info.value)
    assert "generate request" in message
    assert "HTTP 400" in message
    assert "max_tokens=5000 is more than max_model_len" in message
    assert info.value.status == 400
    assert not is_transient(info.value)
    assert len(script.requests_to("/v1/completions")) == 1  # no retry


def test_gives_up_after_max_retries_with_last_error(script: Script) -> None:
    script.queue("/v1/completions", *[busy(503, "overloaded") for _ in range(10)])
    with pytest.raises(
        ServerError, match=r"after 4 attempts; last error: HTTP 503: overloaded"
    ) as info:
        engine(script, max_retries=3).generate(["x"], Sampling())
    assert len(script.requests_to("/v1/completions")) == 4
    assert info.value.transient and is_transient(info.value)


def test_connection_refused_is_retried_then_reported() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    eng = OpenAIEngine("m", base_url=f"http://127.0.0.1:{port}", max_retries=2, backoff=FAST)
    with pytest.raises(ServerError, match=r"after 3 attempts; last error: ConnectError") as info:
        eng.generate(["x"], Sampling())
    assert info.value.transient and is_transient(info.value)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (httpx.ProxyError("proxy answered 502"), True),
        (httpx.LocalProtocolError("illegal header value"), True),
        (httpx.DecodingError("bad gzip body"), False),
        (httpx.TooManyRedirects("redirect loop"), False),
    ],
)
def test_unretried_httpx_errors_leave_as_server_errors(
    monkeypatch: pytest.MonkeyPatch, exc: httpx.HTTPError, transient: bool
) -> None:
    calls: list[str] = []

    async def request(self: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> None:
        calls.append(url)
        raise exc

    monkeypatch.setattr(httpx.AsyncClient, "request", request)
    eng = OpenAIEngine("m", base_url="http://127.0.0.1:9", max_retries=3, backoff=FAST)
    with pytest.raises(ServerError, match=rf"generate request .* {type(exc).__name__}") as info:
        eng.generate(["x"], Sampling())
    assert calls == ["/v1/completions"], "not retried by the engine"
    assert info.value.__cause__ is exc
    assert info.value.transient is transient and is_transient(info.value) is transient


def test_backoff_grows_is_capped_and_jittered() -> None:
    backoff = Backoff(base_s=1.0, max_s=8.0)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered, not a constant
    assert 5.0 <= backoff.delay(0, retry_after=5.0) <= 5.5
    assert Backoff(retry_after_max_s=10).delay(0, retry_after=3600) <= 11.0


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="base_url"):
        OpenAIEngine("m", base_url="localhost:8000")
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIEngine("m", base_url="http://h", max_concurrency=0)
    eng = OpenAIEngine("m", base_url="http://h:1/v1/")
    assert eng.base_url == "http://h:1"
    assert eng.model_id == "m"
    assert isinstance(eng, Engine)  # reads chat_template: must not touch the network


# ---- generate: requests, concurrency, order, parsing ---------------------------------


def test_request_carries_sampling_and_auth(script: Script) -> None:
    sampling = Sampling(n=2, temperature=0.7, top_p=0.9, max_tokens=5, stop=("\n",), seed=11)
    out = engine(script, api_key="sk-test").generate(["p"], sampling)
    assert [c.text for c in out[0]] == ["re:p#0", "re:p#1"]
    (seen,) = script.requests_to("/v1/completions")
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.payload == {
        "model": "m",
        "prompt": "p",
        "n": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 5,
        "stop": ["\n"],
        "seed": 11,
        "return_token_ids": True,
    }


def test_greedy_n_is_sent_once_and_repeated(script: Script) -> None:
    out = engine(script).generate(["p"], Sampling(n=3, temperature=0))
    (seen,) = script.requests_to("/v1/completions")
    assert seen.payload["n"] == 1
    assert "seed" not in seen.payload and "stop" not in seen.payload
    assert [c.text for c in out[0]] == ["re:p#0"] * 3


def test_results_keep_input_order_under_bounded_concurrency(script: Script) -> None:
    def slow_first(path: str, payload: Any) -> Reply:
        index = int(payload["prompt"])
        return Reply(body=completion_body(str(index)), delay=0.05 * (8 - index))

    script.default = slow_first
    prompts = [str(i) for i in range(8)]
    samplings = [Sampling(max_tokens=i + 1) for i in range(8)]
    out = engine(script, max_concurrency=3).generate(prompts, samplings)
    assert [c[0].text for c in out] == [f"{i}#0" for i in range(8)]
    assert script.max_in_flight == 3
    assert sorted(s.payload["max_tokens"] for s in script.seen) == list(range(1, 9))


def test_generate_works_inside_a_running_event_loop(script: Script) -> None:
    async def inside() -> list[list[Completion]]:
        return engine(script).generate(["a", "b"], Sampling())

    out = asyncio.run(inside())
    assert [c[0].text for c in out] == ["re:a#0", "re:b#0"]


def test_generate_rejects_bad_prompts(script: Script) -> None:
    eng = engine(script)
    assert eng.generate([], Sampling()) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate(["a", ""], Sampling())
    with pytest.raises(TypeError, match="not one string"):
        eng.generate("abc", Sampling())
    with pytest.raises(ValueError, match="2 Sampling objects for 1 prompts"):
        eng.generate(["a"], [Sampling(), Sampling()])
    assert script.seen == []


def test_parse_completions_token_counts_stop_and_order() -> None:
    body: dict[str, Any] = {
        "choices": [
            {"index": 1, "text": "b", "finish_reason": "length", "token_ids": [1, 2, 3]},
            {
                "index": 0,
                "text": "a",
                "finish_reason": "stop",
                "stop_reason": "END",
                "token_ids": [5],
                "prompt_token_ids": [9, 9],
            },
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 4},
    }
    a, b = parse_completions(body, n=2, stop=("END",))
    assert a == Completion("a", "stop", prompt_tokens=2, output_tokens=1, stop="END")
    assert b == Completion("b", "length", prompt_tokens=2, output_tokens=3, stop=None)
    assert parse_completions(body, n=2, stop=())[0].stop is None  # not a stop string we sent
    body["choices"][1]["stop_reason"] = 2  # a stop token id (EOS): no stop string
    assert parse_completions(body, n=2, stop=("END",))[0].stop is None


def test_parse_completions_splits_usage_without_token_ids() -> None:
    body = completion_body("t", n=3)
    body["usage"]["completion_tokens"] = 7
    assert [c.output_tokens for c in parse_completions(body, n=3)] == [3, 2, 2]
    with pytest.raises(ServerError, match="asked for n=2 choices, got 3"):
        parse_completions(body, n=2)
    del body["usage"]
    with pytest.raises(ServerError, match="neither usage nor prompt_token_ids"):
        parse_completions(body, n=3)


def test_finish_reason_mapping() -> None:
    assert finish_reason("stop") == "stop"
    assert finish_reason("length") == "length"
    assert finish_reason("abort") == "abort"
    assert finish_reason(None) == "abort"


# ---- prompt_logprobs, chat_prompt, tokenizer endpoints --------------------------------


def test_prompt_logprobs_falls_back_to_echo(script: Script) -> None:
    def echo_only(path: str, payload: Any) -> Reply:
        assert path == "/v1/completions"
        if not payload.get("echo"):  # a server that ignores vLLM's prompt_logprobs
            return Reply(body=completion_body("x", prompt_tokens=3))
        values = [None, -1.5, -0.5, -2.0] if payload["prompt"] == "abc" else [None, -0.25, -3.0]
        return Reply(
            body={
                "choices": [{"index": 0, "text": "...", "logprobs": {"token_logprobs": values}}],
                "usage": {"prompt_tokens": len(values) - 1, "completion_tokens": 1},
            }
        )

    script.default = echo_only
    eng = engine(script)
    assert eng.prompt_logprobs(["abc", "", "de"]) == [[None, -1.5, -0.5], [], [None, -0.25]]
    # probed once: later texts go straight to the echo request
    assert [bool(s.payload.get("echo")) for s in script.seen] == [False, True, True]
    assert script.seen[0].payload["prompt_logprobs"] == 0
    assert script.seen[1].payload["logprobs"] == 1 and script.seen[1].payload["max_tokens"] == 1


def test_prompt_logprobs_picks_the_prompt_token_from_vllm_entries(script: Script) -> None:
    script.queue(
        "/v1/completions",
        Reply(
            body={
                "choices": [
                    {
                        "index": 0,
                        "text": "",
                        "prompt_token_ids": [7, 8, 9],
                        "prompt_logprobs": [
                            None,
                            {"8": {"logprob": -1.0}, "3": {"logprob": -0.1}},
                            {"9": {"logprob": -2.0}},
                        ],
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            }
        ),
    )
    assert engine(script).prompt_logprobs(["xyz"]) == [[None, -1.0, -2.0]]


def test_prompt_logprobs_unsupported_is_a_clear_error(script: Script) -> None:
    def generated_only(path: str, payload: Any) -> Reply:  # like llama.cpp's server
        body = completion_body("x", prompt_tokens=5)
        if payload.get("echo"):
            body["choices"][0]["logprobs"] = {"token_logprobs": [-0.5]}
        return Reply(body=body)

    script.default = generated_only
    with pytest.raises(ServerError, match="neither vLLM's `prompt_logprobs` nor echoed"):
        engine(script).prompt_logprobs(["abc"])


def test_chat_prompt_without_tokenize_endpoint_asks_for_tokenizer(script: Script) -> None:
    eng = engine(script)
    with pytest.raises(ServerError, match=r"HTTP 404.*pass tokenizer=") as info:
        eng.chat_prompt([{"role": "user", "content": "hi"}])
    assert "chat_prompt" in str(info.value)
    with pytest.raises(ServerError, match=r"count_tokens.*pass tokenizer="):
        eng.count_tokens("hello")
    with pytest.raises(ValueError, match=r"messages\[0\] needs string 'role' and 'content'"):
        eng.chat_prompt([{"role": "user"}])  # type: ignore[typeddict-item]


def test_chat_prompt_through_tokenize_and_detokenize(script: Script) -> None:
    vocab = {"<s>user:hi</s>": [1, 2, 3]}

    def tokenizer_server(path: str, payload: Any) -> Reply:
        if path == "/tokenize" and "messages" in payload:
            assert payload["add_generation_prompt"] is False
            return Reply(body={"tokens": [1, 2, 3], "count": 3})
        if path == "/detokenize":
            return Reply(body={"prompt": "<s>user:hi</s>"})
        if path == "/tokenize":
            assert payload["add_special_tokens"] is False
            return Reply(body={"tokens": vocab.get(payload["prompt"], [4, 4])})
        return Reply(status=404, body={})

    script.default = tokenizer_server
    eng = engine(script)
    turns = [{"role": "user", "content": "hi"}]
    assert eng.chat_prompt(turns, add_generation_prompt=False) == "<s>user:hi</s>"  # type: ignore[arg-type]
    assert eng.count_tokens("abc") == 2
    assert eng.chat_template is None  # only a local tokenizer provides it
    vocab.clear()  # now the detokenized text no longer round-trips
    with pytest.raises(ServerError, match="does not re-tokenize to the same ids"):
        eng.chat_prompt(turns, add_generation_prompt=False)  # type: ignore[arg-type]


# ---- api: chat ------------------------------------------------------------------------------


def chat_reply(path: str, payload: Any) -> Reply:
    """A chat-completions server: it answers with the last user turn, echoed."""
    if path != "/v1/chat/completions":
        return Reply(status=404, body={"error": {"message": f"no route {path}"}})
    last = payload["messages"][-1]["content"]
    n = payload.get("n", 1)
    return Reply(
        body={
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": f"re:{last}#{i}"},
                    "finish_reason": "stop",
                }
                for i in range(n)
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 2 * n},
        }
    )


def test_chat_api_sends_conversations_as_messages(script: Script) -> None:
    script.default = chat_reply
    eng = engine(script, api="chat")
    assert eng.chat_template is not None  # stages render chats, the server templates them
    prompt = eng.chat_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    )
    out = eng.generate([prompt], Sampling(n=2, max_tokens=5, seed=3, stop=("\n",)))
    assert [c.text for c in out[0]] == ["re:2+2?#0", "re:2+2?#1"]
    assert out[0][0] == Completion("re:2+2?#0", "stop", prompt_tokens=7, output_tokens=2)
    (seen,) = script.requests_to("/v1/chat/completions")
    assert seen.payload["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
    ]
    assert seen.payload["seed"] == 3 and seen.payload["stop"] == ["\n"]
    assert not script.requests_to("/v1/completions")


def test_chat_api_refuses_raw_text_and_logprobs(script: Script) -> None:
    script.default = chat_reply
    eng = engine(script, api="chat")
    with pytest.raises(ValueError, match="takes conversations rendered by chat_prompt"):
        eng.generate(["<|im_start|>user\nhi"], Sampling())
    with pytest.raises(ValueError, match="need /v1/completions"):
        eng.prompt_logprobs(["hi there"])
    assert not script.seen
    with pytest.raises(ValueError, match="api must be one of"):
        engine(script, api="responses")


@pytest.mark.parametrize(
    ("stage", "why"),
    [
        ({"magpie": {}}, "bare pre-query template"),
        ({"grape": {}}, "prompt log-probabilities"),
        ({"clear": {}}, "self-reflection"),
        ({"judge": {"labels": ["a", "b"], "question": "Which? {response}"}}, "label probabilities"),
        ({"hint_infer": {"verifier": "math"}}, "raw completions"),
        ({"generate": {"prompt_format": "plain"}}, "prompt_format: plain"),
    ],
)
def test_a_chat_engine_refuses_stages_that_need_completions_at_load(
    stage: dict[str, Any], why: str
) -> None:
    from gristmill.pipelines.recipe import Recipe, RecipeError

    chat = {"backend": "openai", "model": "m", "options": {"base_url": "http://x", "api": "chat"}}
    with pytest.raises(RecipeError, match=f"stages\\[0\\] .*api: chat.*{why}"):
        Recipe(stages=[stage], engines={"default": chat})
    # the same stages on a completions server, and chat-friendly stages on chat, load
    Recipe(stages=[stage], engines={"default": {**chat, "options": {"base_url": "http://x"}}})
    Recipe(stages=[{"rejection": {}}, {"generate": {}}], engines={"default": chat})
