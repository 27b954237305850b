"""How the ranks that outlive a dead peer report: a launch with a dead rank fails, so each
survivor writes what it saw to out_dir/rank{rank}.json and the test reads the files."""

import json
from pathlib import Path


def write_outcome(out_dir: str, rank: int, outcome: dict) -> None:
    """This rank's outcome, written whole, then renamed (a reader never sees half a file)."""
    path = Path(out_dir) / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(outcome))
    path.with_suffix(".tmp").rename(path)


def read_outcomes(out_dir: str, ranks) -> dict:
    """{rank: outcome} for `ranks`; each must have reported."""
    outcomes = {}
    for rank in ranks:
        path = Path(out_dir) / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} did not report: it hung or was stopped"
        outcomes[rank] = json.loads(path.read_text())
    return outcomes
