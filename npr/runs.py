"""A training run's folder on disk: OUT/checkpoints/step-N, each complete once it has that name.

Both the trainers (which resume from the newest checkpoint) and the engine (which loads a run
folder as its newest model) read a run through these functions, so the two never disagree about
which checkpoint is the newest. `latest.json` is written for people and tools, never trusted: a
crash between a folder's rename and the pointer's update, or a deleted pointer, must not hide a
checkpoint.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.pt"  # the optimiser, schedule and data position: what resuming needs
WEIGHTS = "config.json"  # with the safetensors beside it: what loading a model needs


def steps(out: Path) -> list[Path]:
    """The run's step-N folders, oldest first (a user's "step-000009 copy" is not one)."""
    root = Path(out) / CHECKPOINTS
    named = root.glob("step-*") if root.is_dir() else []
    return sorted((p for p in named if p.name[5:].isdigit()), key=step_of)


def step_of(path: Path) -> int:
    """The training step a checkpoint folder (step-N) was written after."""
    return int(path.name.rsplit("-", 1)[1])


def newest(out: Path, holding: str = STATE) -> Path | None:
    """The newest step-N folder holding `holding`: the trainer state to resume from, or the
    weights' config to load a model from (a user may delete a large trainer state and keep the
    weights)."""
    done = [p for p in steps(out) if (p / holding).is_file()]
    return done[-1] if done else None
