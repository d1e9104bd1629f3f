"""Training configuration: YAML files plus `section.key=value` overrides from the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml


@dataclass
class ModelConfig:
    path: str = "runs/base"
    dtype: str = "float32"  # float32 | bfloat16
    trust_remote_code: bool = False
    fsdp: bool = False  # FSDP2-shard the trained model across torchrun ranks (GPU runs)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (peft) instead of all weights
    lora_alpha: int = 32
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward (RL and SFT)
    attention: str = "auto"  # trainer forward: auto (flex on GPU) | flex (BlockMask) | default (dense mask)


@dataclass
class DataConfig:
    source: str = "countdown:train"  # a benchmark name, countdown:SPLIT, NAME=PATH or hf:DATASET
    size: int = 4000  # problems drawn from the source (countdown) or first N of a file
    problem_field: str | None = None
    answer_field: str | None = None
    prompt_file: str | None = None  # an instruction of your own ("{problem}" marks the problem)


@dataclass
class RolloutConfig:
    mode: str = "sequential"  # Stage 1 decodes sequentially; Stage 3 in parallel
    n: int = 8  # samples per prompt (the group)
    prompts_per_step: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    max_path_tokens: int | None = None
    enforce_structure: bool = False  # Stage 1: the model must discover the format itself
    repetition_penalty: float = 1.0
    kv_cache_gb: float = 0.5
    attention: str = "auto"  # engine kernel: auto (FlexAttention over the pool on CUDA, SDPA elsewhere) | sdpa | flex
    layout: str = "canonical"  # text forced at forks and joins: canonical | paper (the authors' checkpoints)


@dataclass
class AlgoConfig:
    reward: str = "stage1"  # stage1 (format + accuracy) | stage1_gated | accuracy | module:function
    advantage: str = "group"  # group (DAPO/GRPO) | batch (PAPO)
    loss: str = "dapo"  # dapo | papo
    clip_low: float = 0.2
    clip_high: float = 0.28
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal, sample more
    max_resample: int = 3  # extra sampling rounds per step at most
    overlong_buffer: int = 0  # DAPO soft overlong punishment over this many tokens (0: off)
    overlong_factor: float = 1.0
    schema_filter: bool = False  # PAPO: drop rollouts without an executable parallel schema
    # optimiser steps per rollout batch (DAPO's mini-batches: the kept groups split in this many
    # parts). With more than one, the old log-probs are recomputed by the trainer before the first
    # update, so the ratio starts at exactly 1 and clip-higher acts from the second update on.
    mini_batches: int = 1


@dataclass
class OptimConfig:
    lr: float = 2e-4
    lr_min: float | None = None  # end of the linear/cosine decay (None: lr)
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    micro_batch: int = 32  # sequences per forward/backward at most
    micro_batch_tokens: int = 0  # and at most this many tokens (padded rows x width; 0: no bound)


@dataclass
class SFTConfig:
    epochs: float = 1.0
    steps: int = 0  # optimiser steps (0: as many as `epochs` of the data need)
    batch_size: int = 32  # examples per optimiser step (over all ranks); micro-batches of optim.micro_batch rows
    packing: bool = False  # pack several examples per row (up to max_length tokens) instead of padding
    max_length: int = 4096
    sequential: bool = False  # the sequential-SFT baseline: causal mask, positions 0..L-1
    mask_forced: bool = False  # parallel SFT skips the tokens the engine forces (<step> + label, <takeaway>)


@dataclass
class RunConfig:
    out: str = "runs/stage1"
    steps: int = 40
    seed: int = 0
    save_every: int = 10
    keep_checkpoints: int = 0  # the newest checkpoints kept (0: all); a 4B run's full state is ~56 GB each
    samples_per_step: int = 2  # rollouts written to samples.txt each step
    tensorboard: bool = False

    def __post_init__(self):
        if self.save_every < 1:
            raise ValueError(f"run.save_every must be >= 1 (the final step always saves), got {self.save_every}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"run.keep_checkpoints must be >= 0 (0 keeps all), got {self.keep_checkpoints}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build(cls, values: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = build(sub, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, _example(known[key]), f"{where}.{key}")
    return cls(**kwargs)


def _example(f):
    """A value of the field's type: its default, or for `X | None` fields a zero of type X."""
    if f.default is None:
        kind = str(f.type).split("|")[0].strip()
        return {"float": 0.0, "int": 0, "str": "", "bool": False}.get(kind)
    return f.default


def _coerce(value, default, where: str):
    """Give a value the type of the field's default (YAML reads 1e-6 as a string, for one)."""
    if isinstance(value, list):
        return tuple(value)
    if default is None or default is dataclasses.MISSING or value is None or isinstance(default, tuple):
        return value
    kind = type(default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}") from None


def _parse_yaml(text: str, where: str):
    """yaml.safe_load with a one-line error naming the file (or override) and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where}:{at}: invalid YAML ({problem})") from None


def read_yaml(path: str | Path | None, overrides: list[str] = (), top_level: bool = False) -> dict:
    """A YAML mapping (empty without a path) with `section.key=value` (or `key=value` when
    `top_level`) overrides applied; values are read as YAML."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        data = _parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping")
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not ("." in key or top_level):
            raise ValueError(f"override {item!r}: expected section.key=value")
        value = _parse_yaml(item.split("=", 1)[1], f"override {item!r}")
        if "." in key:
            section, name = key.split(".", 1)
            data.setdefault(section, {})[name] = value
        else:
            data[key] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults) and apply `section.key=value` overrides."""
    return build(Config, read_yaml(path, overrides), str(path) if path else "config")
