"""The engines' view of `gristmill.reaper`: kill an engine's helpers if its owner dies.

Kept so `from gristmill.engines.reaper import child_pids, watch_children` goes on working;
the watcher itself lives in `gristmill.reaper`, which the run's whole-tree watcher shares.
"""

from gristmill.reaper import SHARED_HELPERS, child_pids, watch_children

__all__ = ["SHARED_HELPERS", "child_pids", "watch_children"]
