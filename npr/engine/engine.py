"""The NPR engine: continuous batching of branching trajectories over a paged KV pool.

One `step()` = schedule (`scheduler.py`: admit, chunk prompts, preempt if the pool is short)
-> one model forward over the new tokens of every live branch of every request and one
batched sampling call (`runner.py`) -> apply the schema (`scheduler.py`: fork k branches on
`</guideline>`, join on the last `</step>`, finish on stop, budgets, repetition or an illegal
structure). Nothing falls back to sequential decoding silently.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from npr import runs
from npr.engine.attention import model_shape
from npr.engine.context import ContextTable
from npr.engine.kv_pool import KVPool
from npr.engine.params import SamplingParams
from npr.engine.request import Branch, Completion, Request, Run, completion
from npr.engine.runner import ModelRunner
from npr.engine.sampler import SamplingBatch, noise_base, noise_key
from npr.engine.scheduler import Scheduler
from npr.engine.structure import Allowed, TagState
from npr.tags import TAGS, missing_tags

DEFAULT_KV_GB = 0.25


def resolve_model_dir(path: str | Path, code: bool = False) -> Path:
    """A model folder, a training run folder (its latest checkpoint) or a Hugging Face hub id
    ("Qwen/Qwen3-0.6B") found in the local Hugging Face cache (downloaded when online; with
    `code`, the repository's Python files too, for trust_remote_code)."""
    folder = Path(path)
    if not folder.is_dir():
        folder = _from_hub_cache(str(path), code)
    if not (folder / runs.WEIGHTS).exists():
        folder = runs.newest(folder, runs.WEIGHTS) or folder  # a run folder: its newest checkpoint
    if not (folder / runs.WEIGHTS).exists():
        raise FileNotFoundError(f"{path}: no model here (no config.json; expected a model folder or an npr run)")
    return folder


HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
CODE_FILES = ["*.py"]  # a model's own configuration/modeling code: fetched only with trust_remote_code


def _from_hub_cache(name: str, code: bool = False) -> Path:
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "~")):
        raise FileNotFoundError(f"model directory not found: {name}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    files = HUB_FILES + (CODE_FILES if code else [])
    try:
        return Path(snapshot_download(name, allow_patterns=files, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"{name}: neither a folder nor a model in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
            ) from None
    try:
        return Path(snapshot_download(name, allow_patterns=files))
    except Exception as e:  # no network, unknown repository, gated model: one line, the hub's reason
        raise FileNotFoundError(f"{name}: neither a folder nor a downloadable hub model ({type(e).__name__})") from None


def load(path: str | Path, dtype=None, device=None, trust_remote_code: bool = False, add_tags: bool = True):
    """Load a causal LM and its tokenizer from a local directory (safetensors only).

    `add_tags`: a checkpoint without the NPR tags as single tokens (a hub model never trained
    with them) gets them, as training does (`npr.tokens.add_npr_tokens`), with a notice: the
    engine forks and joins on the tags' ids, and such a model writes them as plain text, so it
    decodes sequentially until trained with them (Stage 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(path, code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype or "auto", use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if add_tags and (missing := missing_tags(tok)):
        from npr.tokens import add_npr_tokens

        add_npr_tokens(tok, model)
        print(f"{path}: the tokenizer had no single token for {', '.join(missing)}; added them (new rows = "
              "the mean of their sub-tokens' rows). A model not trained with them writes them as text "
              "and decodes sequentially.", file=sys.stderr)  # fmt: skip
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval(), tok


def stop_ids(model, tokenizer, vocab: int) -> tuple[int, ...]:
    """The ids that end an answer unless a request names its own: the tokenizer's EOS, the
    generation config's (Qwen3's chat checkpoints list <|im_end|> and <|endoftext|> there, their
    tokenizer names one; an answer ending in the other would run on to its budget) and the token
    the chat template ends an assistant turn with (a base checkpoint's EOS is <|endoftext|>, but
    prompted through its template it closes the turn with <|im_end|>)."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(listed if isinstance(listed, (list, tuple)) else [listed]), turn_end(tokenizer)]
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and 0 <= i < vocab))


def turn_end(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "NPRTURNMARK"
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # a template may refuse this conversation (roles, a system turn it requires)
        return None
    if not isinstance(text, str) or mark not in text:
        return None
    after = tokenizer.encode(text.rsplit(mark, 1)[1].lstrip(" "), add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else None


class LLM:
    """`LLM(model, tokenizer).generate(prompts, SamplingParams(...))` -> list of `Completion`.

    `attention`: "auto" (FlexAttention over the pool in place on CUDA, SDPA elsewhere), "sdpa"
    or "flex" (see `attention.py` for why).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        kv_cache_gb: float | None = None,
        num_pages: int | None = None,
        page_size: int = 16,
        max_num_seqs: int = 256,
        max_batch_tokens: int = 8192,
        attention: str = "auto",
        trust_remote_code: bool = False,
    ):
        if isinstance(model, (str, Path)):
            model, tokenizer = load(model, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            raise ValueError("LLM needs a tokenizer when given a model object")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        layers, kv_heads, head_dim = model_shape(model)
        dtype = next(model.parameters()).dtype
        if num_pages is None:
            gb = kv_cache_gb
            if gb is None:  # GPU: most of what the weights left free; CPU: a small fixed pool
                gb = (
                    0.6 * torch.cuda.mem_get_info(self.device)[0] / 2**30
                    if self.device.type == "cuda"
                    else DEFAULT_KV_GB
                )
            num_pages = KVPool.pages_for_budget(gb, layers, kv_heads, head_dim, page_size, dtype)
        self.pool = KVPool(layers, kv_heads, head_dim, num_pages, page_size, dtype, self.device)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.table = ContextTable(max_num_seqs + 1, self.device, self.vocab)
        self.scheduler = Scheduler(
            self.pool, self.table, tokenizer, max_num_seqs, max_batch_tokens, stop_ids(model, tokenizer, self.vocab)
        )
        self.runner = ModelRunner(model, self.pool, self.table, attention)
        self.tags = self.scheduler.tags
        self._masks: dict[tuple, int] = {}  # (allowed, stops) -> row of `_mask_rows`
        self._mask_rows: list[torch.Tensor] = []
        self._mask_stack: torch.Tensor | None = None
        self._rows: tuple = (None,)  # (steady work, its packed positions that sample, its branches)
        self._next_id = 0
        self._check_backend()

    @property
    def finished(self) -> dict[int, Request]:
        return self.scheduler.finished

    # ---- public API ---------------------------------------------------------------------------

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, replay: list[list[int]] | None = None
    ) -> int:
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        req = Request(self._next_id, ids, params, seed, replay=replay)
        self._next_id += 1
        self.wake()
        self.scheduler.waiting.append(req)
        return req.id

    def abort(self, request_id: int) -> bool:
        """Cancel a request between steps, freeing its KV pages at once; False if it is not live."""
        return self.scheduler.abort(request_id) is not None

    def completion(self, request_id: int) -> Completion:
        """The finished request's `Completion` (removes it from `finished`)."""
        req = self.finished.pop(request_id)
        return completion(req, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))

    def sleep(self) -> None:
        """Give back the KV pool's memory (and the context table's width) between generations, so
        a training update can use it; the next `generate` or `add_request` wakes the engine. At
        the real setting the pool is most of what the weights leave free (40 GB in the Qwen3
        configs), which the update's activations need."""
        if self.has_work():
            raise RuntimeError("the engine cannot sleep with requests in flight")
        self.pool.sleep()
        self.runner.drop_staged()
        self.table.shrink()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        self.pool.wake()

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: bool = False,
        replay: Sequence[list[list[int]]] | None = None,
    ) -> list[Completion]:
        if isinstance(prompts, str):
            prompts = [prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        ids = [self.add_request(p, sp, replay[i] if replay else None) for i, (p, sp) in enumerate(zip(prompts, plist))]
        bar = None
        if progress:
            from rich.progress import Progress

            bar = Progress(transient=True)
            task = bar.add_task("generating", total=len(ids))
            bar.start()
        try:
            while self.has_work():
                self.step()
                if bar:
                    bar.update(task, completed=sum(i in self.finished for i in ids))
        finally:
            if bar:
                bar.stop()
        return [self.completion(i) for i in ids]

    # ---- one engine step ----------------------------------------------------------------------

    def step(self) -> None:
        sched = self.scheduler
        sched.admit()
        work = sched.schedule()
        if not work:
            return
        steady = sched.is_steady(work)
        if steady and self._rows[0] is work:  # last step's rows again: each samples its one new token
            last, sampled = self._rows[1:]
        else:  # which rows sample (once all their pending tokens are computed), at which packed position
            last, sampled, at = [], [], 0
            for b, n in work:
                at += n
                if not b.done and n == b.pending:
                    last.append(at - 1)
                    sampled.append(b)
            self._rows = (work, last, sampled) if steady else (None,)
        targets = [None if b.req.replay is None else sched.replay_target(b) for b in sampled]
        settings = [self._sampling_row(b, target) for b, target in zip(sampled, targets)]
        logits = self.runner.forward(work, sched.to_copy(), last, steady=steady)
        toks, lps = [], []
        if sampled:
            toks, lps = self.runner.sample(logits, sampled, SamplingBatch.of_rows(settings), self._mask_stack)
        sched.postprocess(work, sampled, toks, lps, targets)

    def _sampling_row(self, b: Branch, target: int | None) -> tuple:
        """The branch's `SamplingBatch` row; `target` is its `replay_target`."""
        if target is not None:  # it replays its target (-1 past the end: a token that finishes it)
            return (0.0, 0, 1.0, 1.0, 0, max(target, 0), -1)  # and chooses nothing
        req, run = b.req, b.run
        p = req.params
        mask = -1
        if p.enforce_structure:
            mask = self._mask(b.state.allowed(p.max_plans, self.scheduler.block_fits(b)), req.stops)
        if run.noise < 0:
            run.noise = noise_base(req.seed, run.key)
        penalty = p.repetition_penalty if b.state.phase == "step" else 1.0
        return (p.temperature, p.top_k, p.top_p, penalty, noise_key(run.noise, len(run.tokens)), -1, mask)

    def _mask(self, allowed: Allowed, stops: tuple[int, ...]) -> int:
        """Index of the structure mask (True = disallowed) for this state and these stop ids,
        built once per pair."""
        key = (allowed, stops)
        if key not in self._masks:
            tag_ids_ = torch.tensor([self.tags[t] for t in TAGS])
            ok = torch.tensor([self.tags[t] for t in allowed.tags], dtype=torch.long)
            if allowed.text:
                m = torch.zeros(self.vocab, dtype=torch.bool)
                m[tag_ids_] = True
                m[list(stops)] = not allowed.eos
            else:
                m = torch.ones(self.vocab, dtype=torch.bool)
                if allowed.eos:
                    m[list(stops)] = False
            m[ok] = False
            self._masks[key] = len(self._mask_rows)
            self._mask_rows.append(m)
            self._mask_stack = torch.stack(self._mask_rows).to(self.device)
        return self._masks[key]

    def _check_backend(self) -> None:
        """Fail early, with a clear message, for models that bypass AttentionInterface."""
        from npr.engine import attention

        eos = self.tokenizer.eos_token_id
        run = Run(0, (-1, -1), tokens=[eos if eos is not None else 0], positions=[0], logprobs=[0.0], forced=[True])
        probe = Branch(None, run, [run], TagState(), 0, row=self.table.alloc())
        self.pool.acquire([run.seg])
        self.pool.reserve(run.seg, 1)
        attention.STATE.calls = 0
        try:
            self.runner.forward([(probe, 1)], [], [0])
        finally:
            self.pool.release([run.seg])
            self.table.release(probe.row)
        layers = self.model.config.num_hidden_layers
        if attention.STATE.calls != layers:
            raise ValueError(
                f"{type(self.model).__name__} does not route attention through transformers' AttentionInterface "
                f"({attention.STATE.calls} of {layers} layers did); the NPR engine cannot run it"
            )
