"""What the RL and SFT trainers share: the seeded data stream, optimiser and schedule, the
micro-batch/optimiser-step mechanics (torchrun and FSDP aware) and the run folder (config,
metrics, TensorBoard, progress bar, checkpoints with exact resume)."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import torch
import yaml

from npr.data import atomic_write, read_appended, write_records
from npr.progress import bar as progress_bar
from npr.train import checkpoint, distributed
from npr.train.config import Config, OptimConfig
from npr.train.policy import Policy, load_policy


class TrainingError(RuntimeError):
    pass


class Stream:
    """An endless, seeded shuffle of items (problems or examples); its position is checkpointed."""

    def __init__(self, items: list, seed: int, position: int = 0):
        self.items, self.seed, self.position = items, seed, position
        self._epoch, self._order = -1, []

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.items))
            if epoch != self._epoch:  # one shuffle per epoch, a function of (seed, epoch) alone
                self._epoch, self._order = epoch, list(range(len(self.items)))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            out.append(self.items[self._order[i]])
            self.position += 1
        return out


def make_optimizer(policy: Policy, o: OptimConfig, total_steps: int):
    """AdamW over the trainable weights and a warm-up + constant/linear/cosine schedule to `lr_min`.

    A bf16/fp16 model (unsharded) is trained through fp32 master weights: AdamW updates fp32 copies
    and the model's weights are their rounding. Updating bf16 tensors directly would lose every
    step smaller than half the bf16 spacing (about 6e-5 at a weight of 0.02): at lr 1e-6 almost no
    weight would ever move. The model itself stays in its dtype for rollouts and checkpoints."""
    params = policy.trainable()
    if not policy.fsdp and any(p.dtype in (torch.bfloat16, torch.float16) for p in params):
        policy.master = [p.detach().float().clone().requires_grad_(True) for p in params]
        for h in policy.hooks:  # a second optimiser on the same policy replaces the first one's masters
            h.remove()
        policy.hooks = [p.register_post_accumulate_grad_hook(_into_master(m)) for p, m in zip(params, policy.master)]
        params = policy.master
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    if o.schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"optim.schedule: expected constant, linear or cosine, got {o.schedule!r}")
    floor = (o.lr_min if o.lr_min is not None else o.lr) / o.lr

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        shape = 1 - t if o.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * t))
        return floor + (1 - floor) * shape

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _into_master(master: torch.Tensor):
    """A hook that moves each micro-batch's gradient into the fp32 master as soon as it is
    accumulated: the sum over micro-batches is then taken in fp32 (a bf16 sum would round every
    addition), and no bf16 gradient buffer outlives its backward pass."""

    def hook(p: torch.Tensor) -> None:
        if master.grad is None:
            master.grad = p.grad.float()
        else:
            master.grad.add_(p.grad)
        p.grad = None

    return hook


def micro_batches(lengths: list[int], o: OptimConfig) -> list[list[int]]:
    """Indices of the sequences in each forward/backward: at most `o.micro_batch` sequences and, with
    `o.micro_batch_tokens`, at most that many padded tokens (sequences x the longest). With a token
    budget the sequences are taken shortest first, so short ones share a forward and one very long
    rollout goes alone instead of padding 31 others to its length."""
    budget = o.micro_batch_tokens
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if budget else range(len(lengths))
    out, current, width = [], [], 0
    for i in order:
        wider = max(width, lengths[i])
        if current and (len(current) == o.micro_batch or (budget and wider * (len(current) + 1) > budget)):
            out.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        width = wider
    return out + [current] if current else out


def backward(policy: Policy, chunks: list, run_chunk, pad_id: int) -> None:
    """`run_chunk(chunk)` (forward + backward) for each micro-batch. Under FSDP each forward and
    backward is a collective, so a rank with fewer micro-batches runs zero-loss ones."""
    total = distributed.max_int(len(chunks)) if policy.fsdp else len(chunks)
    for i in range(total):
        if i < len(chunks):
            run_chunk(chunks[i])
        else:
            device = next(policy.model.parameters()).device
            ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
            (policy.model(input_ids=ids).logits.sum() * 0.0).backward()


def check_losses(nonfinite: float, opt) -> None:
    """Stop on non-finite losses, every rank at once: `nonfinite` counts the micro-batches whose
    loss was not finite, summed over the ranks after all of them ran their backward passes. (A rank
    that raised alone mid-step left the others waiting in a collective: across nodes, until the
    process group's 60-minute timeout.)"""
    if nonfinite:
        opt.zero_grad(set_to_none=True)
        n = int(nonfinite)
        raise TrainingError(f"non-finite loss in {n} micro-batch(es); stopped, the last checkpoint is kept")


def optimizer_step(policy: Policy, opt, sched, grad_clip: float) -> float:
    """Sum gradients over ranks, clip, step; returns the gradient norm before clipping."""
    stepped = policy.master or policy.trainable()  # the fp32 masters hold the gradients (_into_master)
    if not policy.fsdp:  # FSDP has already reduce-scattered (summed) the gradients
        distributed.sum_gradients(stepped)
    norm = torch.nn.utils.clip_grad_norm_(stepped, grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        raise TrainingError(f"non-finite gradient norm ({float(norm)}); stopped, the last checkpoint is kept")
    opt.step()
    opt.zero_grad(set_to_none=True)  # free now: the next rollouts' KV pool has that memory (2-16 GB at 4B)
    if policy.master is not None:
        with torch.no_grad():
            for p, m in zip(policy.trainable(), policy.master):
                p.copy_(m)  # the model's weights: the masters rounded to its dtype
    sched.step()
    return float(norm)


RUN_FILES = ("metrics.jsonl", "samples.txt", "checkpoints", "tensorboard")
SAMPLE_HEADER = re.compile(r"^=== step (\d+) ", re.M)


def check_folder(out: Path, resume: bool, overwrite: bool) -> list[str]:
    """The run files already in `out`; a fresh run (neither resume nor overwrite) refuses them. Every
    rank checks, so under torchrun no rank is left waiting for one that stopped."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not (resume or overwrite):
        raise ValueError(
            f"{out} already holds a run ({', '.join(found)}): --resume continues it, --overwrite starts afresh"
        )
    return found


def prepare_folder(out: Path, found: list[str], resumed_step: int | None) -> None:
    """Rank 0: a fresh run clears the run files `found` (checked by `check_folder`); a resumed run
    drops what the previous attempt logged after its last checkpoint, so a step redone after a crash
    is never recorded twice."""
    out.mkdir(parents=True, exist_ok=True)
    if resumed_step is None:
        for name in found:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        return
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        write_records(metrics, [r for r in read_appended(metrics) if r.get("step", 0) <= resumed_step])
    samples = out / "samples.txt"
    if samples.exists():
        text = samples.read_text(encoding="utf-8")
        cut = next((m.start() for m in SAMPLE_HEADER.finditer(text) if int(m.group(1)) > resumed_step), len(text))
        atomic_write(samples, text[:cut])


class Run:
    """A run folder: resolved config, policy (resumed from the latest checkpoint on request),
    metrics.jsonl (+ TensorBoard), samples.txt, progress bar and atomic checkpoints."""

    def __init__(
        self, cfg: Config, resume: bool, progress: bool, label: str, add_tags: bool = False, overwrite: bool = False
    ):
        self.rank, self.world = distributed.init()
        self.cfg, self.out = cfg, Path(cfg.run.out)
        self.ckpt = distributed.from_rank0(checkpoint.latest(self.out)) if resume else None
        if resume and self.ckpt is None:
            raise ValueError(f"--resume: no checkpoint in {self.out}/checkpoints")
        found = check_folder(self.out, resume, overwrite)
        if self.rank == 0:
            prepare_folder(self.out, found, None if self.ckpt is None else checkpoint.step_of(self.ckpt))
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        distributed.barrier()
        distributed.check_shared(self.out)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.policy = load_policy(cfg.model, self.ckpt, add_tags)
        self.progress, self.label = (progress if self.rank == 0 else False), label
        self.writer = None
        if cfg.run.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("run.tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def restore(self, opt, sched, stream: Stream) -> int:
        """Load optimiser, schedule, RNG and data position from the resumed checkpoint; the next step."""
        if self.ckpt is None:
            return 0
        state = checkpoint.load_state(self.ckpt)
        self.policy.load_optimizer_state(opt, state["optimizer"])
        if "scheduler" in state:
            sched.load_state_dict(state["scheduler"])
        stream.position = state["position"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        return state["step"]

    def log(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, metrics["step"])

    def write_samples(self, text: str) -> None:
        if self.rank == 0:
            with (self.out / "samples.txt").open("a") as f:
                f.write(text)

    def maybe_save(self, step: int, total: int, opt, sched, stream: Stream) -> None:
        """Checkpoint every `run.save_every` steps and at the end (every rank calls this)."""
        if step % self.cfg.run.save_every and step != total:
            return
        state = {
            "step": step,
            "position": stream.position,
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        self.policy.save(self.out, step, opt, state)
        if self.rank == 0:
            checkpoint.prune(self.out, self.cfg.run.keep_checkpoints)
        distributed.barrier()

    def bar(self):
        return progress_bar(self.label, self.progress)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
