"""S2L: water-filling, proxy trajectories (shape, reuse), exact budgets, sources, determinism.

The proxy is the bundled SmolLM2 cut to its first 2 layers, trained for one epoch on at most
80 real AlpacaFarm rows (the reference's cosine schedule and warm-up, a higher lr, and two
accumulated micro-batches per step), so every training run here takes seconds on a CPU.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from gristmill.pipelines.layout import SUCCESS
from gristmill.pipelines.pipeline import Pipeline
from gristmill.pipelines.recipe import Recipe
from gristmill.pipelines.stage import ROW_COLUMN, StageContext
from gristmill.records import make_record, records_frame
from gristmill.selectors import s2l
from gristmill.selectors.s2l import (
    S2LConfig,
    S2LSelect,
    TrainSettings,
    checkpoint_steps,
    collate,
    conversation_parts,
    draw_from_clusters,
    load_proxy,
    lr_factor,
    response_losses,
    spread_over_clusters,
    tokenize_examples,
    water_fill,
)

#: A proxy small enough to train in seconds: 2 of 30 layers, short sequences, T = 3.
PROXY: dict[str, Any] = {
    "layers": 2,
    "max_length": 192,
    "epochs": 1,
    "batch_size": 8,
    "micro_batch_size": 4,
    "lr": 5e-4,
    "checkpoints": 3,
    "device": "cpu",
}
ROWS = 64
ALPACA = Path(__file__).resolve().parent / "data" / "alpaca_farm_eval_gpt35_100.jsonl"
MAPPING = {"prompt": "instruction", "input": "input", "response": "output"}


def ctx(run_dir: Path, seed: int = 0) -> StageContext:
    return StageContext(
        stage_name="s2l", stage_index=1, seed=seed, run_dir=run_dir, show_progress=False
    )


def run(frame: pl.DataFrame, context: StageContext, **config: Any) -> pl.DataFrame:
    stage = S2LSelect(S2LConfig(**{**PROXY, "k": 10, "seed": 1, **config}))
    return stage.select(frame.with_row_index(ROW_COLUMN), context)


@dataclass(frozen=True)
class Trained:
    """One training run on the pool, shared by the tests that only select again."""

    run_dir: Path
    stats: dict[str, Any]
    out: pl.DataFrame


@pytest.fixture(scope="module")
def pool(alpaca: pl.DataFrame) -> pl.DataFrame:
    """64 real records from four AlpacaFarm sources."""
    return alpaca.head(ROWS)


@pytest.fixture(scope="module")
def trained(pool: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    run_dir = tmp_path_factory.mktemp("s2l-run")
    context = ctx(run_dir)
    out = run(pool, context, budget=20)
    return Trained(run_dir, dict(context.extra_stats), out)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load (and so train) the proxy fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the proxy was loaded: trajectories were not reused")

    monkeypatch.setattr(s2l, "load_proxy", refuse)


# ---- pure logic -------------------------------------------------------------------------


def test_water_fill_matches_hand_computed_splits() -> None:
    # smallest first, each min(size, left // groups_left): 11//3=3, 8//2=4, 4//1=4
    assert water_fill([10, 10, 10], 11) == [3, 4, 4]
    assert water_fill([3, 3, 3], 7) == [2, 2, 3]
    # sizes 2 (idx 0), 5 (idx 2), 50 (idx 1): 2, then min(5, 28//2)=5, then 23
    assert water_fill([2, 50, 5], 30) == [2, 23, 5]
    # ties keep the input order: the later of two equal groups gets the remainder
    assert water_fill([4, 9, 4], 9) == [3, 3, 3]
    assert water_fill([4, 9, 4], 10) == [3, 4, 3]
    assert water_fill([1, 0, 4], 10) == [1, 0, 4]  # budget above the data: everything
    assert water_fill([5, 5], 0) == [0, 0]
    assert water_fill([], 3) == []
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, 40, size=int(rng.integers(1, 10))).tolist()
        budget = int(rng.integers(0, 250))
        quotas = water_fill(sizes, budget)
        assert sum(quotas) == min(budget, sum(sizes))
        assert all(0 <= q <= s for q, s in zip(quotas, sizes, strict=True))
        # water level: a group below the largest quota is taken whole
        assert all(q == s or q >= max(quotas) - 1 for q, s in zip(quotas, sizes, strict=True))


def test_small_clusters_only_fill_what_the_others_cannot() -> None:
    # clusters of <= 2 rows sit out the water-filling: 10 over [6, 9] is 5 + 5
    assert spread_over_clusters([1, 2, 6, 9], 10, small=2) == ([0, 0, 5, 5], 0)
    # the big clusters hold 6 rows, so 2 more come from the pooled small ones
    assert spread_over_clusters([1, 3, 2, 3], 8, small=2) == ([0, 3, 0, 3], 2)
    assert spread_over_clusters([1, 2], 2, small=2) == ([0, 0], 2)
    assert spread_over_clusters([1, 3, 3], 8, small=0) == ([1, 3, 3], 0)
    labels = np.array([0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3])  # sizes 1, 4, 5, 1
    rng = np.random.default_rng(0)
    for budget in range(12):
        picked = draw_from_clusters(labels, budget, small=2, rng=rng)
        assert len(picked) == len(set(picked.tolist())) == budget
        assert picked.tolist() == sorted(picked.tolist())
        counts = np.bincount(labels[picked], minlength=4)
        if budget <= 9:  # big clusters can cover it: the singletons are untouched
            assert counts[0] == counts[3] == 0
            assert counts[1:3].tolist() == water_fill([4, 5], budget)


def test_checkpoint_steps_spread_to_the_end() -> None:
    assert checkpoint_steps(10, 3) == [3, 7, 10]
    assert checkpoint_steps(4, 4) == [1, 2, 3, 4]
    assert checkpoint_steps(100, 5) == [20, 40, 60, 80, 100]
    with pytest.raises(ValueError, match="at least as many optimizer steps"):
        checkpoint_steps(2, 3)


def test_defaults_are_the_reference_proxy_training() -> None:
    """BigML-CS-UCLA/S2L configs/pythia-70m-deduped_checkpoints.yml: 3 epochs, lr 2e-5,
    cosine with 3% warm-up, no weight decay, batch 32, checkpoints over all of training."""
    cfg = S2LConfig()
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.micro_batch_size) == (3, 2e-5, 32, 8)
    assert (cfg.schedule, cfg.warmup_ratio, cfg.weight_decay) == ("cosine", 0.03, 0.0)
    assert cfg.checkpoints == 12
    # 1,000 rows: 32 steps an epoch, 96 in all; 12 checkpoints reach into every epoch
    settings = TrainSettings(
        epochs=3, lr=2e-5, batch_size=32, micro_batch_size=8, warmup_ratio=0.03,
        schedule="cosine", weight_decay=0.0, checkpoints=12, seed=0,
    )  # fmt: skip
    total = settings.epochs * settings.steps_per_epoch(1000)
    steps = checkpoint_steps(total, 12)
    assert total == 96 and steps == list(range(8, 97, 8))
    assert [sum(1 for s in steps if e * 32 < s <= (e + 1) * 32) for e in range(3)] == [4, 4, 4]
    assert settings.warmup_steps(total) == 3  # ceil(0.03 * 96), as the HF Trainer rounds


def test_lr_warms_up_linearly_then_follows_a_half_cosine_to_zero() -> None:
    assert [lr_factor(s, 100, 4, "cosine") for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lr_factor(52, 100, 4, "cosine") == pytest.approx(0.5)  # half-way after warm-up
    assert lr_factor(100, 100, 4, "cosine") == pytest.approx(0.0)
    curve = [lr_factor(s, 100, 4, "cosine") for s in range(4, 101)]
    assert all(a >= b for a, b in itertools.pairwise(curve))  # decays monotonically
    assert lr_factor(2, 100, 4, "constant") == 0.5
    assert lr_factor(90, 100, 4, "constant") == 1.0
    assert lr_factor(0, 10, 0, "cosine") == 1.0  # no warm-up: the first step at the full lr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": 1.5}, "fraction"),
        ({"layers": 0}, "layers"),
        ({"checkpoints": 0}, "checkpoints"),
        ({"k": 0}, "k must be"),
        ({"lr": 0.0}, "lr"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"batch_size": 4, "micro_batch_size": 8}, "micro_batch_size"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"warmup_ratio": -0.1}, "warmup_ratio"),
        ({"schedule": "linear"}, "schedule"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"max_length": 1}, "max_length"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_bad_config_is_rejected(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S2LConfig(**values)


# ---- the proxy --------------------------------------------------------------------------


def test_prompt_tokens_are_masked_and_heads_on_responses_match(pool: pl.DataFrame) -> None:
    proxy = load_proxy("smollm2-135m-instruct", layers=2, device="cpu", dtype="float32")
    assert proxy.layers == 2 and proxy.total_layers == 30
    assert len(proxy.model.model.layers) == 2
    rows = pool.head(6)
    ids = rows.get_column("id").to_list()
    pairs = [
        conversation_parts(m, where=i)
        for m, i in zip(rows.get_column("messages").to_list(), ids, strict=True)
    ]
    examples, truncated = tokenize_examples(proxy.tokenizer, pairs, ids, max_length=64)
    assert truncated >= 1 and all(len(e.input_ids) <= 64 for e in examples)
    first = examples[0]
    response = proxy.tokenizer.decode(first.input_ids[first.prompt_len :].tolist())
    assert response.startswith(rows.get_column("response")[0][:20])
    assert proxy.tokenizer.decode(first.input_ids[: first.prompt_len].tolist()).endswith(
        "<|im_start|>assistant\n"
    )
    batch = collate(examples, pad_id=2)
    assert (batch["labels"][0, : first.prompt_len] == -100).all()
    fast = response_losses(proxy.model, batch, heads_on_responses=True)
    full = response_losses(proxy.model, batch, heads_on_responses=False)
    assert fast[1].tolist() == full[1].tolist()
    assert fast[1].tolist() == [len(e.input_ids) - e.prompt_len for e in examples]
    np.testing.assert_allclose(fast[0].detach().numpy(), full[0].detach().numpy(), rtol=1e-4)


def test_rows_without_a_response_name_the_row(tmp_path: Path) -> None:
    recs = [make_record([{"role": "user", "content": "no answer"}], source="s")]
    with pytest.raises(ValueError, match=recs[0]["id"]):
        run(records_frame(recs), ctx(tmp_path), budget=1)


# ---- the stage --------------------------------------------------------------------------


def test_trajectories_have_the_right_shape_and_fall(trained: Trained, pool: pl.DataFrame) -> None:
    stats = trained.stats
    assert stats["reused"] is False and stats["N"] == ROWS and stats["T"] == 3
    table = Path(stats["trajectories"])
    assert table.parent == trained.run_dir / "s2l"
    traj = pl.read_parquet(table)
    assert traj.columns == ["id", "source", "loss_0", "loss_1", "loss_2"]
    assert traj.height == ROWS
    assert traj.get_column("id").to_list() == pool.get_column("id").to_list()
    losses = traj.select("loss_0", "loss_1", "loss_2").to_numpy()
    assert np.isfinite(losses).all() and (losses > 0).all()
    means = losses.mean(axis=0)
    assert means[0] > means[1] > means[2]  # training lowers the loss
    assert (losses[:, 2] < losses[:, 0]).mean() > 0.8
    meta = json.loads(table.with_suffix(".json").read_text())
    assert meta["checkpoint_steps"] == [3, 5, 8] and meta["total_steps"] == 8
    assert meta["schedule"] == {
        "name": "cosine", "lr": 5e-4, "warmup_ratio": 0.03, "warmup_steps": 1,
        "weight_decay": 0.0, "epochs": 1, "batch_size": 8, "micro_batch_size": 4,
        "total_steps": 8, "optimizer": "AdamW", "max_grad_norm": 1.0,
    }  # fmt: skip
    assert meta["layers"] == 2 and meta["total_layers"] == 30
    assert meta["train_tokens"] > ROWS * 40 and meta["tokens_per_s"] > 0
    assert meta["train_seconds"] > 0 and stats["tokens_per_s"] == meta["tokens_per_s"]
    np.testing.assert_allclose(meta["mean_loss_per_checkpoint"], means)
    # output rows carry their cluster and final loss
    out = trained.out
    assert out.height == 20
    by_id = dict(zip(traj.get_column("id"), traj.get_column("loss_2"), strict=True))
    for row_id, loss in zip(out.get_column("id"), out.get_column("s2l_loss"), strict=True):
        assert loss == pytest.approx(by_id[row_id])
    assert out.get_column("cluster").max() < stats["K"]


@pytest.mark.usefixtures("no_training")
def test_budget_is_met_exactly_and_trajectories_reused(
    trained: Trained, pool: pl.DataFrame
) -> None:
    sizes = pool.get_column("source").value_counts().sort("source")
    names, counts = sizes.get_column("source").to_list(), sizes.get_column("count").to_list()
    for budget in (1, 7, 20, 33, 0.5, 63, 64, 500):
        context = ctx(trained.run_dir)
        out = run(pool, context, budget=budget)
        want = min(budget if isinstance(budget, int) else round(budget * ROWS), ROWS)
        assert out.height == want
        rows = out.get_column(ROW_COLUMN).to_list()
        assert rows == sorted(rows) and len(set(rows)) == want
        stats = context.extra_stats
        assert stats["reused"] is True
        assert stats["train_seconds"] == trained.stats["train_seconds"]
        quotas = water_fill(counts, want)
        assert [stats["sources"][s]["quota"] for s in names] == quotas
        picked = out.get_column("source").value_counts()
        got = dict(zip(picked.get_column("source"), picked.get_column("count"), strict=True))
        assert [got.get(s, 0) for s in names] == quotas


@pytest.mark.usefixtures("no_training")
def test_two_sources_are_water_filled(trained: Trained, pool: pl.DataFrame) -> None:
    halves = pool.with_columns(
        pl.when(pl.int_range(pl.len()) < 10)
        .then(pl.lit("small"))
        .otherwise(pl.lit("big"))
        .alias("origin")
    )
    context = ctx(trained.run_dir)
    out = run(halves, context, budget=30, source_field="origin", k=5)
    # smallest source first: min(10, 30 // 2) = 10, then the big one takes the other 20
    counts = out.get_column("origin").value_counts().sort("origin")
    assert counts.get_column("count").to_list() == [20, 10]
    assert set(out.filter(pl.col("origin") == "small").get_column(ROW_COLUMN)) == set(range(10))
    sources = context.extra_stats["sources"]
    assert sources["big"]["quota"] == 20 and sources["big"]["k"] == 5
    assert sum(sources["big"]["cluster_sizes"]) == ROWS - 10
    # one source: the whole budget goes over its clusters
    single = run(halves, ctx(trained.run_dir), budget=25, source_field=None, k=8)
    assert single.height == 25 and single.get_column("cluster").max() < 8


def test_micro_batches_accumulate_to_the_same_step_as_one_batch(pool: pl.DataFrame) -> None:
    """8 rows in one pass or in four accumulated passes of 2: the same update, the same
    losses (the batch's token mean, not a mean of micro-batch means)."""
    rows = pool.head(8)
    ids = rows.get_column("id").to_list()
    pairs = [
        conversation_parts(m, where=i)
        for m, i in zip(rows.get_column("messages").to_list(), ids, strict=True)
    ]
    losses = []
    for micro in (8, 2):
        proxy = load_proxy("smollm2-135m-instruct", layers=2, device="cpu", dtype="float32")
        examples, _ = tokenize_examples(proxy.tokenizer, pairs, ids, max_length=128)
        settings = TrainSettings(
            epochs=2, lr=1e-3, batch_size=8, micro_batch_size=micro, warmup_ratio=0.0,
            schedule="constant", weight_decay=0.0, checkpoints=2, seed=0,
        )  # fmt: skip
        result = s2l.train_trajectories(proxy, examples, settings, progress=False)
        assert result.steps == [1, 2]
        losses.append(result.losses)
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-4)
    assert (losses[0][:, 1] < losses[0][:, 0]).mean() > 0.8  # the steps did train


def test_same_seed_same_trajectories_and_picks(pool: pl.DataFrame, tmp_path: Path) -> None:
    few = pool.head(12)  # 3 optimizer steps of 4 rows, one checkpoint after each
    outs, tables = [], []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        context = ctx(tmp_path / name)
        outs.append(run(few, context, budget=5, seed=seed, k=3, batch_size=4, micro_batch_size=2))
        assert context.extra_stats["reused"] is False
        tables.append(pl.read_parquet(context.extra_stats["trajectories"]))
    assert tables[0].equals(tables[1])
    assert outs[0].get_column("id").to_list() == outs[1].get_column("id").to_list()
    assert not tables[0].equals(tables[2])  # another seed shuffles differently


def test_rerun_with_another_budget_in_a_pipeline(tmp_path: Path) -> None:
    def recipe(budget: int | float) -> dict[str, Any]:
        return {
            "name": "s2l-test",
            "seed": 5,
            "input": {"path": str(ALPACA), "mapping": MAPPING, "limit": 16},
            "stages": [
                {
                    "s2l": {
                        **PROXY,
                        "batch_size": 4,
                        "budget": budget,
                        "k": 4,
                        "source_field": "dataset",
                    }
                }
            ],
        }

    run_dir = tmp_path / "run"
    summaries = []
    for budget in (10, 0.25):
        pipe = Pipeline(
            Recipe.from_dict(recipe(budget), where="test"), run_dir, show_progress=False
        )
        dataset = pipe.run()
        frame = pl.read_parquet(sorted((dataset / "data").glob("*.parquet")))
        assert frame.height == (10 if budget == 10 else 4)
        assert {"cluster", "s2l_loss"} <= set(frame.columns)
        summaries.append(json.loads((pipe.stages[0].dir / SUCCESS).read_text()))
    first, second = summaries
    assert first["fingerprint"] != second["fingerprint"]
    assert first["extra"]["reused"] is False and second["extra"]["reused"] is True
    assert first["extra"]["trajectories"] == second["extra"]["trajectories"]
    assert first["extra"]["seed"] == second["extra"]["seed"]  # derived from the run seed
    assert len(list((run_dir / "s2l").glob("trajectories-*.parquet"))) == 1
