"""Where everything of a run lives: the one place that knows a run folder's paths.

    RUN/00_input-<fp>/part-00000.parquet ...        the input, split into parts
    RUN/01_<stage>-<fp>/part-00000.parquet ...      a stage's kept rows, part by part
    RUN/01_<stage>-<fp>/part-00000.stats.json       per-part stats (map stages)
    RUN/01_<stage>-<fp>/rejected/part-00000.parquet dropped rows with `drop_reason`
    RUN/01_<stage>-<fp>/state/part-00000/           a part's resumable loop state
    RUN/01_<stage>-<fp>/_SUCCESS.json               the stage is complete (fingerprint, stats)
    RUN/dataset/data/train-00000-of-00001.parquet   the finished dataset, and its README.md
    RUN/manifest.json                               recipe, fingerprints, stage stats, versions
    RUN/logs/run.log                                every process's log lines
    RUN/logs/vllm-logging.json                      the logging config vLLM's processes read
    RUN/logs/engines.jsonl                          when each engine started and closed

The pipeline, the output writer and the run log write through it; the catalog, the report
and the tests read through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SUCCESS = "_SUCCESS.json"
REJECTED = "rejected"
STATE = "state"
DATASET_DIR = "dataset"
DATASET_DATA = "data"
MANIFEST = "manifest.json"
LOGS = "logs"
INPUT_PREFIX = "00_input-"

#: `NN_<name>-<fingerprint>`: a stage folder's name (the input is stage 00).
STAGE_DIR = re.compile(r"^(\d{2,})_(.+)-([0-9a-f]{6,})$")


def part_name(index: int) -> str:
    """File name of part `index`."""
    return f"part-{index:05d}.parquet"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder."""

    root: Path

    def __post_init__(self) -> None:
        # a str (a run folder typed at a prompt) works as a Path does
        object.__setattr__(self, "root", Path(self.root))

    def input_dir(self, fingerprint: str) -> Path:
        """The input split's folder."""
        return self.root / f"{INPUT_PREFIX}{fingerprint[:10]}"

    def stage_dir(self, index: int, name: str, fingerprint: str) -> Path:
        """Stage `index`'s folder (1-based, as in folder names)."""
        return self.root / f"{index:02d}_{name}-{fingerprint[:10]}"

    @staticmethod
    def part(folder: Path, index: int) -> Path:
        """Part `index` of a stage (or the input) folder: its kept rows."""
        return folder / part_name(index)

    @staticmethod
    def part_stats(folder: Path, index: int) -> Path:
        """Part `index`'s stats of a map stage."""
        return folder / f"part-{index:05d}.stats.json"

    @staticmethod
    def rejected(folder: Path, index: int) -> Path:
        """Part `index`'s dropped rows."""
        return folder / REJECTED / part_name(index)

    @staticmethod
    def state(folder: Path, index: int) -> Path:
        """Part `index`'s private folder of resumable loop state."""
        return folder / STATE / f"part-{index:05d}"

    @staticmethod
    def success(folder: Path) -> Path:
        """The marker a finished stage writes (fingerprint and stats)."""
        return folder / SUCCESS

    @staticmethod
    def written_parts(folder: Path) -> list[Path]:
        """The kept-row parts on disk, in order (an unfinished stage's so far)."""
        return sorted(folder.glob("part-*.parquet"))

    @staticmethod
    def rejected_parts(folder: Path) -> list[Path]:
        """The dropped-row parts on disk, in order."""
        return sorted((folder / REJECTED).glob("part-*.parquet"))

    @property
    def dataset_dir(self) -> Path:
        """The finished dataset folder (a trainer loads it as is)."""
        return self.root / DATASET_DIR

    @property
    def dataset_data(self) -> Path:
        """The dataset's Parquet files' folder."""
        return self.dataset_dir / DATASET_DATA

    @property
    def manifest(self) -> Path:
        """The run's provenance record."""
        return self.root / MANIFEST

    @property
    def logs_dir(self) -> Path:
        """The run's log folder."""
        return self.root / LOGS

    @property
    def run_log(self) -> Path:
        """The log every process of the run writes (`gristmill run` routes it here)."""
        return self.logs_dir / "run.log"

    @property
    def vllm_logging_config(self) -> Path:
        """The logging config vLLM's processes read (`VLLM_LOGGING_CONFIG_PATH`)."""
        return self.logs_dir / "vllm-logging.json"

    @property
    def engine_log(self) -> Path:
        """One JSON line per engine start and close, from every process of the run."""
        return self.logs_dir / "engines.jsonl"

    def is_run(self) -> bool:
        """A folder holding a manifest or an input split is a run."""
        return self.manifest.is_file() or any(self.root.glob(f"{INPUT_PREFIX}*/"))

    def newest_stage_dirs(self) -> dict[int, tuple[str, Path]]:
        """Per stage index (0: the input), the newest folder's stage name and path: a rerun
        with another config leaves older folders beside it."""
        newest: dict[int, tuple[str, Path]] = {}
        for folder in self.root.iterdir():
            m = STAGE_DIR.match(folder.name)
            if m and folder.is_dir():
                index = int(m.group(1))
                if index not in newest or folder.stat().st_mtime > newest[index][1].stat().st_mtime:
                    newest[index] = (m.group(2), folder)
        return newest
