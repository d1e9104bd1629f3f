"""Atomic checkpoints: Hugging Face weights (safetensors) + tokenizer + trainer state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from npr.data import atomic_write
from npr.runs import CHECKPOINTS, STATE, newest, step_of, steps

__all__ = ["STATE", "latest", "load_state", "prune", "save", "step_of"]


def save(out: Path, step: int, model, tokenizer, state: dict, state_dict: dict | None = None) -> Path:
    """Write out/checkpoints/step-N via a temporary folder renamed at the end; update `latest`."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    _plain_config(tmp, model, state_dict)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE)
    _sync(tmp)  # on disk before the name says complete: a power cut must not leave a torn step-N
    old = root / f".old-step-{step:06d}"
    if final.exists():  # a step written again: renamed aside first, so no moment lacks a complete one
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _sync(root)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write(root / "latest.json", json.dumps({"step": step, "path": final.name}))
    return final


def _sync(folder: Path) -> None:
    """fsync a folder's files and the folder itself (its entries: a rename is durable only then)."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0: keep all), after `latest` points to the newest."""
    if keep < 1:
        return
    for old in steps(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(out: Path) -> Path | None:
    """The newest checkpoint to resume from: the newest step-N folder with a trainer state
    (npr/runs.py; `latest.json` is not trusted)."""
    return newest(out, STATE)


def load_state(path: Path) -> dict:
    # mapped, not read: a 4B model's optimiser state is ~48 GB, and every rank loads it
    return torch.load(path / STATE, weights_only=True, mmap=True)


def _plain_config(folder: Path, model, state_dict: dict | None) -> None:
    """FSDP2 renames a model's class (FSDPQwen3ForCausalLM) and holds fp32 shards under mixed
    precision; the saved config must name the HF class and the dtype the weights were saved in."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return
    plain = next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = [plain.__name__]
    dtypes = {v.dtype for v in (state_dict or {}).values() if v.is_floating_point()}
    if len(dtypes) == 1:
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
