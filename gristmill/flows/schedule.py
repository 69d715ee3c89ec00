"""When a served recipe runs: a cron string or an interval, with a time zone.

A recipe may carry a top-level `schedule:` (`cron: "0 3 * * *"` or `interval: 86400`
seconds, plus an optional `timezone:`); `gristmill serve --cron/--interval` overrides it.
"""

from __future__ import annotations

import datetime
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gristmill.pipelines.recipe import RecipeError, read_recipe_raw

if TYPE_CHECKING:
    from prefect.schedules import Schedule

SCHEDULE_KEYS = ("cron", "interval", "timezone")


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    """Exactly one of a cron string or an interval in seconds; IANA time zone (UTC default)."""

    cron: str | None = None
    interval: float | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("a schedule takes exactly one of `cron` or `interval` (seconds)")
        if self.interval is not None and not self.interval > 0:
            raise ValueError(f"schedule interval must be > 0 seconds, got {self.interval}")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"schedule timezone {self.timezone!r} is not an IANA zone") from exc
        self.to_prefect()  # a bad cron string fails here, not when the server gets it

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str) -> ScheduleSpec:
        """Build from a recipe's `schedule:` mapping, naming the file on bad input."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: `schedule` must be a mapping with `cron` or `interval`")
        unknown = sorted(set(data) - set(SCHEDULE_KEYS))
        if unknown:
            raise RecipeError(
                f"{where}: schedule: unknown key(s) {unknown}; allowed: {list(SCHEDULE_KEYS)}"
            )
        cron, interval = data.get("cron"), data.get("interval")
        if cron is not None and not isinstance(cron, str):
            raise RecipeError(f"{where}: schedule.cron must be a string, got {cron!r}")
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int | float)
        ):
            raise RecipeError(f"{where}: schedule.interval must be seconds, got {interval!r}")
        try:
            return cls(
                cron=cron,
                interval=None if interval is None else float(interval),
                timezone=str(data.get("timezone") or "UTC"),
            )
        except ValueError as exc:
            raise RecipeError(f"{where}: schedule: {exc}") from exc

    def to_prefect(self) -> Schedule:
        """The Prefect schedule object for `to_deployment(schedules=[...])`."""
        from prefect.schedules import Cron, Interval

        if self.cron is not None:
            return Cron(self.cron, timezone=self.timezone)
        assert self.interval is not None
        return Interval(datetime.timedelta(seconds=self.interval), timezone=self.timezone)

    def describe(self) -> str:
        """One line for logs: `cron 0 3 * * * (UTC)` or `every 3600s (UTC)`."""
        what = f"cron {self.cron}" if self.cron is not None else f"every {self.interval:g}s"
        return f"{what} ({self.timezone})"


def recipe_schedule(path: str | Path) -> ScheduleSpec | None:
    """The recipe's own `schedule:`, or None when it has none."""
    raw = read_recipe_raw(path).get("schedule")
    return None if raw is None else ScheduleSpec.from_mapping(raw, where=str(path))


def pick_schedule(
    path: str | Path,
    *,
    cron: str | None = None,
    interval: float | None = None,
    timezone: str | None = None,
) -> ScheduleSpec | None:
    """The command line's schedule when given, else the recipe's; None: run on demand only."""
    if cron is not None or interval is not None:
        try:
            return ScheduleSpec(cron=cron, interval=interval, timezone=timezone or "UTC")
        except ValueError as exc:
            raise ValueError(f"--cron/--interval: {exc}") from exc
    own = recipe_schedule(path)
    if own is not None and timezone is not None:
        return ScheduleSpec(cron=own.cron, interval=own.interval, timezone=timezone)
    return own
