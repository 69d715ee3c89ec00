"""An engine for any OpenAI-compatible server (`vllm serve`, SGLang, llama.cpp server).

The only module in gristmill that speaks HTTP. Raw prompts go to `POST /v1/completions`,
one request per prompt (with `n`), sent concurrently under a semaphore; 429, 5xx, dropped
connections and timeouts are retried with exponential backoff and jitter (Retry-After is
honoured); any other 4xx fails at once with the server's message. No httpx exception leaves
this module: failures are `ServerError`s, `transient` when a later try may work (retries
used up, or a transport error such as a proxy failure), so `engines.base` needs no httpx.

What each server offers beyond plain completions:

- `prompt_logprobs`: vLLM's `prompt_logprobs` extra parameter (tested on vLLM 0.32); else
  the legacy `echo=True, logprobs=1` mode, which vLLM and SGLang fill with prompt logprobs
  (SGLang only when `logprobs` is non-zero, hence 1). llama.cpp's server echoes logprobs of
  the generated token only: that, and any server with neither, gets a clear error.
- `chat_prompt`, `count_tokens` without a local `tokenizer`: vLLM only (`/tokenize` with
  messages, then `/detokenize`, accepted only if re-tokenizing gives the same ids). Other
  servers need `tokenizer=` (a local folder or hub id) and render with transformers.
- `chat_template` comes from the local `tokenizer` only (None without one).
- Exact `output_tokens` per choice when `n > 1`: vLLM (`return_token_ids`). Servers that only
  report usage for the whole request get it split evenly over the choices (the total is kept).

vLLM-only request fields (`return_token_ids`, `prompt_logprobs`) are sent only where needed;
OpenAI-compatible servers built on pydantic (SGLang, llama.cpp) ignore unknown fields.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx

from gristmill.engines.base import (
    RETRY_STATUSES,
    Completion,
    FinishReason,
    Messages,
    Sampling,
    ServerError,
    check_messages,
    check_prompts,
    per_prompt,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Transport failures retried here: refused/dropped connections and timeouts. Any httpx
#: error that is not retried, or still fails after the retries, leaves as a `ServerError`.
RETRY_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)

LogprobMode = Literal["prompt_logprobs", "echo"]


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Exponential backoff with jitter: attempt k waits about base·2^k, capped at `max_s`."""

    base_s: float = 0.5
    max_s: float = 30.0
    #: Longest Retry-After honoured, so a misbehaving server cannot stall a run for hours.
    retry_after_max_s: float = 600.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        if retry_after is not None:
            wait = min(max(retry_after, 0.0), self.retry_after_max_s)
            return wait + random.uniform(0.0, 0.1 * wait)  # spread clients sent to the same time
        ceiling = min(self.max_s, self.base_s * 2.0**attempt)
        return random.uniform(ceiling / 2, ceiling)  # "equal jitter": never zero, never above cap


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or HTTP-date), None if absent/bad."""
    if value is None or not value.strip():
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)


def server_message(response: httpx.Response) -> str:
    """The error text a server put in its response body (OpenAI, vLLM or plain text)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    return str(body)[:500]


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop.

    With a loop already running in this thread (Jupyter, a Prefect async task) the coroutine
    runs on a fresh loop in a worker thread instead of deadlocking.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


#: The server APIs an OpenAIEngine can speak.
APIS = ("completions", "chat")
#: How an `api: chat` engine's `chat_prompt` marks an encoded conversation.
CHAT_PREFIX = "\x00gristmill-chat\x00"
#: `chat_template` of an `api: chat` engine without a local tokenizer: the server's own.
SERVER_TEMPLATE = "{# the server applies the model's chat template (api: chat) #}"


class OpenAIEngine:
    """An `Engine` backed by an OpenAI-compatible HTTP server.

    `model` is the served model name, sent with every request; `base_url` is the server root
    (a trailing `/v1` is accepted and dropped). `tokenizer` (local folder or hub id) renders
    chat prompts and counts tokens locally; without it the server's `/tokenize` is used.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None = None,
        tokenizer: str | None = None,
        max_concurrency: int = 16,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        backoff: Backoff | None = None,
        api: str = "completions",
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the served model name, got {model!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if api not in APIS:
            raise ValueError(f"api must be one of {list(APIS)}, got {api!r}")
        #: `completions` (raw prompts, /v1/completions) or `chat` (conversations only,
        #: /v1/chat/completions: for hosted APIs without completions).
        self.api = api
        self.model_id = model
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff = backoff if backoff is not None else Backoff()
        self.tokenizer_name = tokenizer
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._hf_tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self._logprob_mode: LogprobMode | None = None

    def __repr__(self) -> str:
        return f"OpenAIEngine(model={self.model_id!r}, base_url={self.base_url!r})"

    # ---- Engine protocol -------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        """Sample continuations of raw-text prompts: one concurrent request per prompt (with
        `api: chat`, each prompt is a conversation `chat_prompt` encoded)."""
        check_prompts(prompts)
        if not prompts:
            return []
        samplings = per_prompt(sampling, len(prompts))
        items = list(zip(prompts, samplings, strict=True))
        if self.api == "chat":
            for i, prompt in enumerate(prompts):
                decode_chat(prompt, where=f"prompt {i}")  # refuse raw text before any request
            return run_sync(lambda: self._gather(items, self._chat_one))
        return run_sync(lambda: self._gather(items, self._complete_one))

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        """Log-probability of each token of each text given its prefix (first token: None).

        Empty texts give an empty list, like the in-process engine.
        """
        check_prompts(texts, allow_empty=True)
        if self.api == "chat":
            raise ValueError(
                f"{self.model_id}: prompt log-probabilities need /v1/completions; this engine "
                "has api: chat"
            )
        todo = [i for i, text in enumerate(texts) if text]
        results: list[list[float | None]] = [[] for _ in texts]
        if todo:
            rows = run_sync(lambda: self._all_logprobs([texts[i] for i in todo]))
            for i, row in zip(todo, rows, strict=True):
                results[i] = row
        return results

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        """Render a conversation through the model's own chat template, as raw text (with
        `api: chat`, the conversation itself, encoded for `generate` to send as messages)."""
        turns = check_messages(messages)
        if self.api == "chat":
            if not add_generation_prompt:
                raise ValueError("api: chat renders only conversations awaiting a reply")
            return CHAT_PREFIX + json.dumps(turns, ensure_ascii=False)
        if self.tokenizer_name is not None:
            rendered = self._tokenizer().apply_chat_template(
                turns, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            if not isinstance(rendered, str):
                raise TypeError(f"apply_chat_template returned {type(rendered).__name__}")
            return rendered
        return run_sync(lambda: self._server_chat_prompt(turns, add_generation_prompt))

    def count_tokens(self, text: str) -> int:
        """Number of tokens the model's tokenizer gives `text` (no special tokens added)."""
        if self.tokenizer_name is not None:
            return len(self._tokenizer().encode(text, add_special_tokens=False))
        return len(run_sync(lambda: self._server_tokenize(text)))

    @property
    def chat_template(self) -> str | None:
        """The local tokenizer's Jinja chat template; None without `tokenizer`.

        Never asks the server: a property must stay cheap (`isinstance(x, Engine)` reads it).
        With `api: chat` the server applies its own template, so stages render chats.
        """
        if self.tokenizer_name is None:
            return SERVER_TEMPLATE if self.api == "chat" else None
        template = getattr(self._tokenizer(), "chat_template", None)
        if isinstance(template, dict):  # named templates: chat uses the default one
            template = template.get("default")
        return template if isinstance(template, str) else None

    # ---- HTTP with retries -------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(
                max_connections=self.max_concurrency,
                max_keepalive_connections=self.max_concurrency,
            ),
        )

    async def _request(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        *,
        kind: str,
        payload: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request, retrying transient failures; returns the parsed JSON body."""
        url = f"{self.base_url}{path}"
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                response = await client.request(method, path, json=payload)
            except RETRY_ERRORS as exc:
                last = f"{type(exc).__name__}: {exc}".rstrip(": ")
            except httpx.HTTPError as exc:
                raise _unretried_error(exc, kind=kind, url=url) from exc
            else:
                status = response.status_code
                if status < 400:
                    return _json_body(response, kind=kind, url=url)
                if status not in RETRY_STATUSES:
                    raise ServerError(
                        f"{kind} request to {url} failed with HTTP {status}: "
                        f"{server_message(response)}",
                        kind=kind,
                        status=status,
                    )
                last = f"HTTP {status}: {server_message(response)}"
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            if attempt == self.max_retries:
                break
            wait = self.backoff.delay(attempt, retry_after)
            log.warning(
                "%s request to %s failed (%s); retry %d/%d in %.1fs",
                kind, url, last, attempt + 1, self.max_retries, wait,
            )  # fmt: skip
            await asyncio.sleep(wait)
        raise ServerError(
            f"{kind} request to {url} still failing after {self.max_retries + 1} attempts; "
            f"last error: {last}",
            kind=kind,
            transient=True,
        )

    async def _gather(
        self,
        items: Sequence[T],
        one: Callable[[httpx.AsyncClient, T], Awaitable[Any]],
    ) -> list[Any]:
        """Run `one` over `items` with at most `max_concurrency` in flight; input order kept."""
        semaphore = asyncio.Semaphore(self.max_concurrency)

        async def bounded(client: httpx.AsyncClient, item: T) -> Any:
            async with semaphore:
                return await one(client, item)

        async with self._client() as client:
            tasks = [asyncio.create_task(bounded(client, item)) for item in items]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    # ---- generate ------------------------------------------------------------------------
    async def _complete_one(
        self, client: httpx.AsyncClient, item: tuple[str, Sampling]
    ) -> list[Completion]:
        prompt, sampling = item
        greedy = sampling.temperature == 0
        n = 1 if greedy else sampling.n  # vLLM refuses n>1 with greedy decoding
        payload = self._sampling_payload(sampling, n, prompt=prompt)
        if n > 1:
            payload["return_token_ids"] = True  # vLLM: exact per-choice output token counts
        body = await self._request(
            client, "POST", "/v1/completions", kind="generate", payload=payload
        )
        done = parse_completions(body, n=n, stop=sampling.stop)
        return done * sampling.n if len(done) == 1 < sampling.n else done

    def _sampling_payload(self, sampling: Sampling, n: int, **content: Any) -> dict[str, Any]:
        """A request body: the model, `content` (prompt or messages) and the sampling."""
        payload: dict[str, Any] = {
            "model": self.model_id,
            **content,
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if sampling.stop:
            payload["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            payload["seed"] = sampling.seed
        return payload

    async def _chat_one(
        self, client: httpx.AsyncClient, item: tuple[str, Sampling]
    ) -> list[Completion]:
        prompt, sampling = item
        greedy = sampling.temperature == 0
        n = 1 if greedy else sampling.n
        payload = self._sampling_payload(sampling, n, messages=decode_chat(prompt, where="prompt"))
        body = await self._request(
            client, "POST", "/v1/chat/completions", kind="generate", payload=payload
        )
        done = parse_chat_completions(body, n=n, stop=sampling.stop)
        return done * sampling.n if len(done) == 1 < sampling.n else done

    # ---- prompt log-probabilities ------------------------------------------------------
    async def _all_logprobs(self, texts: list[str]) -> list[list[float | None]]:
        if self._logprob_mode is None:  # probe the server once with the first text
            async with self._client() as client:
                first = await self._logprobs_one(client, texts[0])
            return [first, *await self._gather(texts[1:], self._logprobs_one)]
        return await self._gather(texts, self._logprobs_one)

    async def _logprobs_one(self, client: httpx.AsyncClient, text: str) -> list[float | None]:
        base = {"model": self.model_id, "prompt": text, "max_tokens": 1, "temperature": 0.0}
        if self._logprob_mode in (None, "prompt_logprobs"):
            payload = {**base, "prompt_logprobs": 0, "return_token_ids": True}
            body = await self._request(
                client, "POST", "/v1/completions", kind="prompt_logprobs", payload=payload
            )
            row = logprobs_from_prompt_logprobs(body)
            if row is not None:
                self._logprob_mode = "prompt_logprobs"
                return row
            if self._logprob_mode == "prompt_logprobs":
                raise ServerError(
                    f"prompt_logprobs: {self.base_url} stopped returning prompt_logprobs",
                    kind="prompt_logprobs",
                )
        payload = {**base, "echo": True, "logprobs": 1}  # SGLang ignores logprobs=0
        body = await self._request(
            client, "POST", "/v1/completions", kind="prompt_logprobs", payload=payload
        )
        row = logprobs_from_echo(body)
        if row is None:
            raise ServerError(
                f"prompt_logprobs: the server at {self.base_url} returns neither vLLM's "
                "`prompt_logprobs` nor echoed prompt logprobs (`echo=True, logprobs=1`); "
                "use a vLLM (or SGLang) server, or the in-process vllm engine",
                kind="prompt_logprobs",
            )
        self._logprob_mode = "echo"
        return row

    # ---- tokenizer: local or the server's -------------------------------------------------
    def _tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._hf_tokenizer is None:
                from transformers import AutoTokenizer

                self._hf_tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
            return self._hf_tokenizer

    def _needs_tokenizer(self, what: str, exc: ServerError) -> ServerError:
        return ServerError(
            f"{what}: the server at {self.base_url} cannot do this through vLLM's "
            f"/tokenize and /detokenize ({exc}); pass tokenizer=<local folder or hub id> "
            "to OpenAIEngine to do it locally",
            kind=exc.kind,
            status=exc.status,
        )

    async def _server_tokenize(self, text: str) -> list[int]:
        payload = {"model": self.model_id, "prompt": text, "add_special_tokens": False}
        try:
            async with self._client() as client:
                body = await self._request(
                    client, "POST", "/tokenize", kind="tokenize", payload=payload
                )
        except ServerError as exc:
            raise self._needs_tokenizer("count_tokens", exc) from exc
        return _token_list(body, kind="tokenize", url=f"{self.base_url}/tokenize")

    async def _server_chat_prompt(
        self, turns: list[dict[str, str]], add_generation_prompt: bool
    ) -> str:
        chat = {
            "model": self.model_id,
            "messages": turns,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            async with self._client() as client:
                body = await self._request(
                    client, "POST", "/tokenize", kind="tokenize", payload=chat
                )
                ids = _token_list(body, kind="tokenize", url=f"{self.base_url}/tokenize")
                body = await self._request(
                    client,
                    "POST",
                    "/detokenize",
                    kind="detokenize",
                    payload={"model": self.model_id, "tokens": ids},
                )
        except ServerError as exc:
            raise self._needs_tokenizer("chat_prompt", exc) from exc
        text = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise ServerError(
                f"chat_prompt: /detokenize at {self.base_url} returned no 'prompt' text",
                kind="detokenize",
            )
        if await self._server_tokenize(text) != ids:
            raise ServerError(
                f"chat_prompt: the server's detokenized chat prompt does not re-tokenize to "
                f"the same ids, so it is not exact; pass tokenizer=<local folder or hub id> "
                f"to OpenAIEngine (server: {self.base_url})",
                kind="detokenize",
            )
        return text


# ---- response parsing (pure functions) ------------------------------------------------


def parse_completions(body: Any, *, n: int, stop: Sequence[str] = ()) -> list[Completion]:
    """Turn a `/v1/completions` response for one prompt into its `n` Completions, in order.

    Output tokens come from each choice's `token_ids` when the server returns them (vLLM);
    otherwise usage is exact for n=1 and split evenly over the choices for n>1.
    """
    choices, usage = _choices_and_usage(body, n)
    prompt_ids = choices[0].get("prompt_token_ids")
    if isinstance(prompt_ids, list):
        prompt_tokens = len(prompt_ids)
    elif isinstance(usage.get("prompt_tokens"), int):
        prompt_tokens = usage["prompt_tokens"]
    else:
        raise ServerError(
            "generate: response has neither usage nor prompt_token_ids", kind="generate"
        )
    shares = _split(usage.get("completion_tokens"), n)
    out = []
    for choice, share in zip(choices, shares, strict=True):
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            output_tokens = len(ids)
        elif share is not None:
            output_tokens = share
        else:
            raise ServerError("generate: response has no completion token counts", kind="generate")
        stop_reason = choice.get("stop_reason")
        out.append(
            Completion(
                text=str(choice.get("text") or ""),
                finish_reason=finish_reason(choice.get("finish_reason")),
                prompt_tokens=prompt_tokens,
                output_tokens=output_tokens,
                stop=stop_reason if isinstance(stop_reason, str) and stop_reason in stop else None,
            )
        )
    return out


def decode_chat(prompt: str, *, where: str) -> list[dict[str, str]]:
    """The conversation an `api: chat` engine's `chat_prompt` encoded; raw text is refused."""
    if not prompt.startswith(CHAT_PREFIX):
        raise ValueError(
            f"{where}: an engine with api: chat takes conversations rendered by chat_prompt, "
            f"not raw text ({prompt[:60]!r}...)"
        )
    turns = json.loads(prompt[len(CHAT_PREFIX) :])
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in turns]


def parse_chat_completions(body: Any, *, n: int, stop: Sequence[str] = ()) -> list[Completion]:
    """Turn a `/v1/chat/completions` response into its `n` Completions, in order (output
    tokens from usage, split evenly over the choices for n>1)."""
    choices, usage = _choices_and_usage(body, n)
    prompt_tokens = usage.get("prompt_tokens")
    shares = _split(usage.get("completion_tokens"), n)
    if not isinstance(prompt_tokens, int) or any(s is None for s in shares):
        raise ServerError("generate: chat response has no token usage", kind="generate")
    out = []
    for choice, share in zip(choices, shares, strict=True):
        raw_message = choice.get("message")
        message: dict[str, Any] = raw_message if isinstance(raw_message, dict) else {}
        stop_reason = choice.get("stop_reason")
        out.append(
            Completion(
                text=str(message.get("content") or ""),
                finish_reason=finish_reason(choice.get("finish_reason")),
                prompt_tokens=prompt_tokens,
                output_tokens=int(share or 0),
                stop=stop_reason if isinstance(stop_reason, str) and stop_reason in stop else None,
            )
        )
    return out


def _choices_and_usage(body: Any, n: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A generate response's `n` choices in index order, and its usage (empty if absent)."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise ServerError(
            f"generate: response has no 'choices' list: {str(body)[:300]}", kind="generate"
        )
    choices = sorted(body["choices"], key=lambda c: int(c.get("index", 0)))
    if len(choices) != n:
        raise ServerError(f"generate: asked for n={n} choices, got {len(choices)}", kind="generate")
    raw_usage = body.get("usage")
    return choices, raw_usage if isinstance(raw_usage, dict) else {}


def finish_reason(raw: object) -> FinishReason:
    """Map a server's finish reason onto gristmill's: 'stop', 'length' or 'abort'."""
    if raw in ("stop", "eos", "stop_sequence", "end_turn"):
        return "stop"
    if raw in ("length", "max_tokens"):
        return "length"
    return "abort"


def logprobs_from_prompt_logprobs(body: Any) -> list[float | None] | None:
    """Per-token logprobs from vLLM's `prompt_logprobs` answer; None if the server has none."""
    choice = _first_choice(body)
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or not entries:
        return None
    ids = choice.get("prompt_token_ids")
    row: list[float | None] = [None]
    for position, entry in enumerate(entries[1:], start=1):
        if not isinstance(entry, dict) or not entry:
            raise ServerError(
                f"prompt_logprobs: no logprob for prompt token {position}", kind="prompt_logprobs"
            )
        if isinstance(ids, list) and str(ids[position]) in entry:
            picked = entry[str(ids[position])]
        elif len(entry) == 1:
            picked = next(iter(entry.values()))
        else:
            raise ServerError(
                f"prompt_logprobs: cannot tell which logprob belongs to prompt token {position}",
                kind="prompt_logprobs",
            )
        row.append(float(picked["logprob"] if isinstance(picked, dict) else picked))
    return row


def logprobs_from_echo(body: Any) -> list[float | None] | None:
    """Prompt-token logprobs from an `echo=True, logprobs=1` answer; None if it has none.

    `token_logprobs` must cover the whole prompt (llama.cpp's covers only generated tokens).
    """
    choice = _first_choice(body)
    logprobs = choice.get("logprobs")
    usage = body.get("usage") if isinstance(body, dict) else None
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if not isinstance(logprobs, dict) or not isinstance(prompt_tokens, int):
        return None
    values = logprobs.get("token_logprobs")
    if not isinstance(values, list) or len(values) < prompt_tokens:
        return None
    row: list[float | None] = [None]
    row.extend(None if v is None else float(v) for v in values[1:prompt_tokens])
    return row


# ---- small helpers ------------------------------------------------------------------------


def _split(total: object, n: int) -> list[int | None]:
    if not isinstance(total, int):
        return [None] * n
    share, rest = divmod(total, n)
    return [share + (1 if i < rest else 0) for i in range(n)]


def _first_choice(body: Any) -> dict[str, Any]:
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerError(
            f"prompt_logprobs: response has no choices: {str(body)[:300]}", kind="prompt_logprobs"
        )
    return choices[0]


def _unretried_error(exc: httpx.HTTPError, *, kind: str, url: str) -> ServerError:
    """An httpx error the loop does not retry, as a ServerError: transport ones are transient."""
    return ServerError(
        f"{kind} request to {url} failed: {type(exc).__name__}: {exc}".rstrip(": "),
        kind=kind,
        transient=isinstance(exc, httpx.TransportError),
    )


def _json_body(response: httpx.Response, *, kind: str, url: str) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ServerError(
            f"{kind} request to {url}: HTTP {response.status_code} with a non-JSON body: "
            f"{response.text[:300]!r}",
            kind=kind,
            status=response.status_code,
        ) from exc


def _token_list(body: Any, *, kind: str, url: str) -> list[int]:
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ServerError(f"{kind} request to {url} returned no 'tokens' list", kind=kind)
    return tokens
