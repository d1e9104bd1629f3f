"""Atomic checkpoints: Hugging Face weights (safetensors) + tokenizer + trainer state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from npr.data import atomic_write

STATE = "trainer_state.pt"


def save(out: Path, step: int, model, tokenizer, state: dict, state_dict: dict | None = None) -> Path:
    """Write out/checkpoints/step-N via a temporary folder renamed at the end; update `latest`."""
    root = out / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    _plain_architecture(tmp, model)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest = root / "latest.json"
    atomic_write(latest, json.dumps({"step": step, "path": final.name}))
    return final


def latest(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    path = out / "checkpoints" / json.loads(pointer.read_text())["path"]
    return path if (path / STATE).exists() else None


def step_of(path: Path) -> int:
    """The training step a checkpoint folder (step-N) was written after."""
    return int(path.name.rsplit("-", 1)[1])


def load_state(path: Path) -> dict:
    return torch.load(path / STATE, weights_only=True)


def _plain_architecture(folder: Path, model) -> None:
    """FSDP2 renames a model's class (FSDPQwen3ForCausalLM); the saved config must name the HF class."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return
    plain = next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = [plain.__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
