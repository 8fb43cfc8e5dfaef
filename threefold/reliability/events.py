"""The reliability log: one JSON line per notable event in `<logging.out_dir>/events.jsonl`.

Hangs, stragglers, skipped steps, rollbacks, preemptions and resumes go here, from whichever rank saw
them (a hang may be seen by any rank, not only the logging rank). Each event opens the file in append
mode, writes one short line and closes it, so ranks do not interleave within a line and no handle stays
open for the life of the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, out_dir: str | Path, *, rank: int) -> None:
        self.path = Path(out_dir) / "events.jsonl"
        self.rank = rank

    def write(self, event: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 3), "event": event, "rank": self.rank, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_events(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every event logged under `out_dir` (for tests and tools)."""
    path = Path(out_dir) / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
