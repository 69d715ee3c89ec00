"""The `generate` stage on scripted engines: candidates per parent, models, prompts, seeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from gristmill.engines.base import Completion, Messages, Sampling, per_prompt
from gristmill.pipelines.config import RecipeError
from gristmill.pipelines.recipe import Recipe
from gristmill.pipelines.stage import StageContext
from gristmill.records import make_record, records_frame
from gristmill.synth.generate import Generate, GenerateStats


@dataclass(kw_only=True)
class Echo:
    """Answers `<model>#<k>: <last line of the prompt>`; a chat template when `chat`."""

    model_id: str
    chat: bool = True
    calls: list[tuple[list[str], list[Sampling]]] = field(default_factory=list)

    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        params = per_prompt(sampling, len(prompts))
        self.calls.append((list(prompts), params))
        return [
            [
                Completion(
                    text=f" {self.model_id}#{k}: {p.splitlines()[-1][-30:]}",
                    finish_reason="length" if k == 1 else "stop",
                    prompt_tokens=len(p.split()),
                    output_tokens=4,
                )
                for k in range(s.n)
            ]
            for p, s in zip(prompts, params, strict=True)
        ]

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        raise NotImplementedError

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    @property
    def chat_template(self) -> str | None:
        return "{{ scripted }}" if self.chat else None


def ctx(tmp_path: Path, engines: dict[str, Echo]) -> StageContext:
    return StageContext(
        stage_name="generate",
        stage_index=1,
        seed=0,
        run_dir=tmp_path,
        engine_names=tuple(engines),
        engine_factory=lambda name: engines[name],  # type: ignore[arg-type,return-value]
    )


def instructions(n: int = 3) -> pl.DataFrame:
    rows = [
        make_record(
            [{"role": "user", "content": f"question {i}"}], source="test", topic=f"topic {i}"
        )
        for i in range(n)
    ]
    return records_frame(rows)


def test_two_engines_give_n_candidates_each_with_their_model(tmp_path: Path) -> None:
    a, b = Echo(model_id="model-a"), Echo(model_id="model-b", chat=False)
    stage = Generate(engines=("a", "b"), n=2, temperature=0.8)
    out = stage.process(instructions(), ctx(tmp_path, {"a": a, "b": b}))
    assert out.height == 3 * 2 * 2
    assert len(a.calls) == len(b.calls) == 1, "one batched call per engine per part"
    per_parent = out.group_by("parent_id").agg(pl.col("model").sort())
    assert per_parent.height == 3
    for models in per_parent["model"].to_list():
        assert models == ["model-a", "model-a", "model-b", "model-b"]
    assert set(out["parent_id"]) == set(instructions()["id"])
    assert out.filter(pl.col("engine") == "b")["response"].str.starts_with("model-b#").all()
    # a chat model gets its template; a base model a plain transcript that stops at `User:`
    assert a.calls[0][0][0].startswith("<user>question 0")
    assert b.calls[0][0][0] == "User: question 0\n\nAssistant:"
    assert "\nUser:" in b.calls[0][1][0].stop and "\nUser:" not in a.calls[0][1][0].stop
    # per request seeds: from the row and the engine
    seeds_a = [s.seed for s in a.calls[0][1]]
    seeds_b = [s.seed for s in b.calls[0][1]]
    assert len(set(seeds_a)) == 3 and not set(seeds_a) & set(seeds_b)
    assert out["finish_reason"].to_list().count("length") == 6
    assert out["drop_reason"].is_null().all()


def test_template_system_prompt_and_dropping_truncated(tmp_path: Path) -> None:
    a = Echo(model_id="m")
    stage = Generate(
        template="Explain {topic} briefly: {prompt}",
        system_prompt="You are terse.",
        n=2,
        drop_truncated=True,
    )
    out = stage.process(instructions(2), ctx(tmp_path, {"default": a}))
    sent = a.calls[0][0][0]
    assert sent.startswith("<system>You are terse.\n<user>Explain topic 0 briefly: question 0")
    assert out.filter(pl.col("drop_reason") == "truncated").height == 2
    with pytest.raises(ValueError, match=r"template field 'nope' is not a column"):
        Generate(template="{nope}").process(instructions(1), ctx(tmp_path, {"default": a}))


def test_keep_input_adds_a_second_models_answers_to_the_same_instructions(
    tmp_path: Path,
) -> None:
    a, b = Echo(model_id="model-a"), Echo(model_id="model-b")
    first = Generate(n=2).process(instructions(), ctx(tmp_path, {"default": a}))
    both = Generate(n=1, keep_input=True).process(first, ctx(tmp_path, {"default": b}))
    assert both.height == 3 * 2 + 3
    assert len(b.calls[0][0]) == 3, "each instruction is answered once, not once per candidate"
    counts = both.group_by("parent_id", "model").len().sort("parent_id", "model")
    assert counts["len"].to_list() == [2, 1] * 3
    assert set(both["parent_id"]) == set(instructions()["id"])
    plain = Generate(keep_input=True).process(instructions(1), ctx(tmp_path, {"default": b}))
    assert plain["parent_id"].to_list() == [instructions(1)["id"][0]] * 2


def test_recipe_engines_are_resolved_and_checked() -> None:
    base = {"input": {"rows": 2}, "stages": [{"generate": {"engines": ["a", "b"]}}]}
    engines = {"a": {"model": "x"}, "b": {"model": "y", "resident": True}}
    recipe = Recipe.from_dict({**base, "engines": engines})
    assert recipe.stage_engines(recipe.stages[0]) == ("a", "b")
    assert recipe.engines["b"].resident and not recipe.engines["a"].resident
    assert Recipe(**recipe.to_dict()) == recipe
    with pytest.raises(
        RecipeError, match=r"engine 'b' is not one of the recipe's engines \['a', 'c'\]"
    ):
        Recipe.from_dict({**base, "engines": {"a": {"model": "x"}, "c": {"model": "z"}}})
    with pytest.raises(RecipeError, match=r"name one of the recipe's engines \['a', 'b'\]"):
        Recipe.from_dict({**base, "stages": [{"generate": {}}], "engines": engines})
    with pytest.raises(RecipeError, match="not both"):
        Recipe.from_dict({**base, "engine": {"model": "x"}, "engines": engines})
    single = Recipe.from_dict({**base, "stages": ["generate"], "engine": {"model": "x"}})
    assert single.engine is not None and single.engine.model == "x"
    assert single.stage_engines(single.stages[0]) == ("default",)
    with pytest.raises(RecipeError, match="the recipe has no `engine:`"):
        Recipe.from_dict({**base, "stages": ["generate"]})


def test_engine_names_stay_out_of_the_fingerprint(tmp_path: Path) -> None:
    from gristmill.pipelines.pipeline import Pipeline

    def planned(name: str) -> str:
        recipe = Recipe.from_dict(
            {
                "input": {"rows": 2},
                "engines": {name: {"model": "x"}},
                "stages": [{"generate": {"engines": [name]}}],
            }
        )
        return Pipeline(recipe, tmp_path).stages[0].fingerprint

    assert planned("teacher") == planned("other-name")


def test_stats_of_parts_merge_per_engine(tmp_path: Path) -> None:
    a, b = Echo(model_id="model-a"), Echo(model_id="model-b")
    stage = Generate(engines=("a", "b"), n=2)
    parts = []
    for rows in (3, 2):
        context = ctx(tmp_path, {"a": a, "b": b})
        stage.process(instructions(rows), context)
        parts.append(GenerateStats.from_dict(context.extra_stats))
    assert parts[0].to_dict() == {"prompts": 3, "candidates": {"a": 6, "b": 6}}
    merged = GenerateStats.merge(parts).to_dict()
    assert merged == {"prompts": 5, "candidates": {"a": 10, "b": 10}}
