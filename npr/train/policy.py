"""The model being trained, shared by the RL and SFT trainers.

`Policy.model` is the Hugging Face module that both the engine and the topology forward run;
optional LoRA (peft) layers are injected into it, and with FSDP2 its decoder layers are sharded
across ranks. Rollouts need every weight on every rank, so `full_weights()` gathers them for the
length of a generation and frees them after. Checkpoints always hold plain full Hugging Face
weights (LoRA merged in), so the next stage and `npr eval` load them like any model.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from npr.engine import load
from npr.modeling import use_trainer_attention
from npr.train import checkpoint, distributed
from npr.train.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    lora: bool = False
    fsdp: bool = False
    master: list[torch.Tensor] | None = None  # fp32 copies of the trainable weights (bf16/fp16 models)
    hooks: list = field(default_factory=list)  # the hooks that move gradients into `master`
    dtype: torch.dtype = torch.float32  # compute and checkpoint dtype (model.dtype in the config)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextmanager
    def full_weights(self):
        """Under FSDP: all-gather every layer once, keep it gathered through any number of forwards
        (ranks may decode different lengths without meeting in a collective), reshard on exit."""
        if not self.fsdp:
            yield
            return
        mods = _fsdp_modules(self.model)
        for m in mods:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in mods:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)

    def gathered(self) -> dict | None:
        """Under FSDP the full fp32 weights (the masters), gathered once per checkpoint: a collective."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state_dict(self, full: dict | None) -> dict | None:
        """Full Hugging Face weights for a checkpoint, in the model's dtype (None: the model's own);
        `full`: `gathered()`."""
        if full is not None:
            cast = {}  # by tensor, so tied weights stay one tensor (save_pretrained drops the duplicate)
            for v in full.values():
                if id(v) not in cast:
                    cast[id(v)] = v.to(self.dtype) if v.is_floating_point() else v
            return {k: cast[id(v)] for k, v in full.items()}
        if self.lora:
            return _merged_lora(self.model)
        return None

    def extra_state(self) -> dict:
        """What a resume needs beyond the optimiser: the adapter weights under LoRA."""
        if not self.lora:
            return {}
        return {"adapter": {k: v.detach().cpu().clone() for k, v in self.model.named_parameters() if v.requires_grad}}

    def optimizer_state(self, opt, full: dict | None = None) -> dict:
        """The optimiser's state and, for bf16/fp16 models, the fp32 masters (`full`: `gathered()`
        under FSDP) so that a resume continues from them, not from the rounded weights."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_optimizer_state_dict(self.model, opt, options=opts)
            if self.dtype != torch.float32:
                state["master_weights"] = full
            return state
        state = opt.state_dict()
        if self.master is not None:  # an exact resume needs the masters' low bits too
            state["master"] = [m.detach().cpu().clone() for m in self.master]
        return state

    def load_optimizer_state(self, opt, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            state = dict(state)
            masters = state.pop("master_weights", None)
            if masters is not None:  # the fp32 values, not the checkpoint's rounded weights
                set_model_state_dict(self.model, masters, options=opts)
            set_optimizer_state_dict(self.model, opt, optim_state_dict=state, options=opts)
        else:
            state = dict(state)
            master = state.pop("master", None)
            if self.master is not None and master is not None:
                with torch.no_grad():
                    for m, saved in zip(self.master, master):
                        m.copy_(saved)
            opt.load_state_dict(state)

    def save(self, out: Path, step: int, opt, state: dict) -> None:
        """Weights, optimiser state and `state`. Every rank calls this (under FSDP the full weights
        are gathered collectively, once for both); rank 0 writes."""
        import torch.distributed as dist

        full = self.gathered()
        weights = self.state_dict(full)
        state = {**state, "optimizer": self.optimizer_state(opt, full), **self.extra_state()}
        if not dist.is_initialized() or dist.get_rank() == 0:
            checkpoint.save(out, step, self.model, self.tokenizer, state, state_dict=weights)


def load_policy(cfg: ModelConfig, ckpt: Path | None = None, add_tags: bool = False) -> Policy:
    """Load `cfg.path` (or the checkpoint `ckpt` when resuming) and apply LoRA / FSDP as configured.

    `add_tags`: give the tokenizer and model the NPR tags when the base model lacks them (SFT)."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype: expected one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.lora_rank and cfg.fsdp:
        raise ValueError("model.lora_rank and model.fsdp together are not supported (LoRA keeps a full copy per rank)")
    fsdp = cfg.fsdp and distributed.init()[1] > 1
    if cfg.fsdp and not fsdp:
        print("model.fsdp: one process, nothing to shard; training unsharded (fp32 masters for bf16)", file=sys.stderr)
    # LoRA resumes from the frozen base plus the saved adapter, so the base weights stay bit-exact.
    source = cfg.path if (ckpt is None or cfg.lora_rank) else ckpt
    dtype = DTYPES[cfg.dtype]
    # FSDP keeps the sharded weights (the masters) and Adam's state in fp32 and computes in `dtype`
    held = torch.float32 if fsdp else dtype
    model, tok = load(source, dtype=held, trust_remote_code=cfg.trust_remote_code, add_tags=False)
    model.eval()
    use_trainer_attention(model, cfg.attention)  # the trainer's kernel; the engine runs its own
    if add_tags:
        from npr.tags import missing_tags
        from npr.tokens import add_npr_tokens

        missing = missing_tags(tok)
        if missing and cfg.lora_rank:
            raise ValueError(f"{source}: the model lacks the tags {missing}; LoRA cannot train new embedding rows")
        add_npr_tokens(tok, model)
    policy = Policy(model, tok, dtype=dtype)
    if cfg.lora_rank:
        _add_lora(model, cfg)
        policy.lora = True
        if ckpt is not None:
            adapter = checkpoint.load_state(ckpt).get("adapter")
            if adapter is None:
                raise ValueError(f"{ckpt}: model.lora_rank is set but the checkpoint holds no adapter weights")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in adapter.items():
                    params[k].copy_(v)
    if fsdp:
        model.npr_compute_dtype = dtype  # the gathered weights' dtype (npr.modeling.compute_dtype)
        _shard(model, dtype)
        policy.fsdp = True
    if cfg.gradient_checkpointing:  # active in train mode only: rollouts are unaffected
        enable_checkpointing(model)
    return policy


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass (train mode only)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def _add_lora(model, cfg: ModelConfig) -> None:
    """Inject LoRA layers in place (the returned PeftModel wrapper is not needed: the HF module runs)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("model.lora_rank needs peft: pip install 'native-parallel-reasoner[lora]'") from None
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    lc = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets)
    get_peft_model(model, lc)


def _merged_lora(model) -> dict:
    """The plain weights W + scale * B @ A, computed without touching the live (unmerged) model."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            w = mod.get_base_layer().weight.detach()
            for adapter in mod.active_adapters:
                w = w + mod.get_delta_weight(adapter).detach()
            out[f"{name}.weight"] = w.clone()
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out.setdefault(key, value.detach().clone())
    return out


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _shard(model, dtype: torch.dtype) -> None:
    """FSDP2: one shard group per decoder layer, the rest (embeddings, head) in the root group.

    Mixed precision: the shards (master weights) and the optimiser state are fp32; each forward
    all-gathers the weights cast to `dtype` (bf16: half the traffic, bf16 compute) and gradients
    are reduce-scattered in fp32, so small updates and sums are not rounded away."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ValueError(f"model.fsdp: cannot find the decoder layers of {type(model).__name__}")
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in _fsdp_modules(model):
        # The loss is already a global token-mean: sum the shards' gradients, do not average them.
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    # FSDP initialises itself on the first forward through the root; the engine calls inner modules.
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
