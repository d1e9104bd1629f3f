"""`npr bench decode`: how close a decode step comes to the memory-bandwidth bound.

A decode step of a large model must read every weight once and each row's keys and values;
on a GPU moving those bytes is the floor of its time. The share printed here is that floor
(bytes a step must read / bandwidth) over the step's measured time: 1.0 would be the bound,
the rest is overhead (host work between kernels, launches, the attention's own traffic).
The bandwidth is measured on the spot with a large device copy, and the GPU's nominal figure
is given beside it when the device is one we know.
"""

from __future__ import annotations

import random
import time

import torch

from npr.bench import _sync, filler_ids, hf_timer

# nominal memory bandwidth (bytes/s) by a substring of torch.cuda.get_device_name()
NOMINAL = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
           "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12,
           "L40S": 8.64e11, "A10G": 6.0e11}  # fmt: skip


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied embeddings are one
    tensor), except an untied input embedding, of which a step reads only its rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one context token holds across all layers."""
    from npr.engine.attention import model_shape

    layers, kv_heads, head_dim = model_shape(model)
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def copy_bandwidth(device: torch.device, mib: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a large device-to-device copy (each byte read once and written once), best of
    `repeats`: the bandwidth a kernel can really reach on this device."""
    mib = mib or (1024 if device.type == "cuda" else 256)
    x = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


def nominal_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in NOMINAL.items() if key in name), None)


def bench_decode(
    model, tok, batch: int, prompt_tokens: int = 1024, new_tokens: int = 64, attention: str = "auto",
    hf_generate: bool = True, repeats: int = 3, bandwidth: float | None = None, page_size: int = 16,
) -> dict:  # fmt: skip
    """Time per decode step of `batch` rows (prompt `prompt_tokens`, then `new_tokens` replayed
    tokens each), for the engine and optionally HF `generate`, and the share of the bound.

    A decode step's time is (time of the whole request - time of its prefill and first token)
    / (new_tokens - 1), best of `repeats` interleaved runs; its bytes are the weights plus the
    rows' mean context (prompt + new_tokens / 2 tokens) of keys and values."""
    from npr.engine import LLM, SamplingParams

    if batch < 1 or prompt_tokens < 1 or new_tokens < 2:
        raise ValueError("--batch and --prompt-tokens must be >= 1 and --new-tokens >= 2")
    dev = next(model.parameters()).device
    rng = random.Random(0)
    words = filler_ids(tok)
    prompts = [[rng.choice(words) for _ in range(prompt_tokens)] for _ in range(batch)]
    targets = [[rng.choice(words) for _ in range(new_tokens)] for _ in range(batch)]
    kw: dict = {}
    if dev.type != "cuda":  # a pool of what the run needs (the CPU default is a fixed 0.25 GB)
        kw["num_pages"] = batch * -(-(prompt_tokens + new_tokens + 1) // page_size) + 1
    llm = LLM(model, tok, max_num_seqs=max(batch, 1), attention=attention, page_size=page_size, **kw)
    sp = SamplingParams(mode="sequential", max_tokens=new_tokens, enforce_structure=False, repetition_limit=10**6)

    def engine(n: int) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, replay=[[t[:n]] for t in targets])
        _sync(dev)
        t = time.perf_counter() - t0
        if any(o.token_ids != x[:n] for o, x in zip(outs, targets)):
            raise RuntimeError("replay diverged: the engine did not decode the target token ids")
        return t

    hf = hf_timer(model, prompts) if hf_generate else None
    engine(new_tokens)  # warm-up (allocator, kernels, compilation)
    times = {"engine": [float("inf")] * 2, "hf": [float("inf")] * 2}
    for _ in range(repeats):
        for i, n in enumerate((new_tokens, 1)):
            times["engine"][i] = min(times["engine"][i], engine(n))
            if hf:
                times["hf"][i] = min(times["hf"][i], hf(n))
    bandwidth = bandwidth or copy_bandwidth(dev)
    step_bytes = weight_bytes(model) + batch * (prompt_tokens + new_tokens / 2) * kv_bytes_per_token(model)
    bound = step_bytes / bandwidth
    out = {"batch": batch, "prompt": prompt_tokens, "new_tokens": new_tokens, "page_size": page_size,
           "step_bytes": step_bytes, "copy_bandwidth": bandwidth, "nominal_bandwidth": nominal_bandwidth(dev),
           "bound_s": bound}  # fmt: skip
    for name, (whole, first) in times.items():
        if name == "hf" and not hf:
            out.update(hf_step_s=None, hf_share=None)
            continue
        step = max(whole - first, 1e-9) / (new_tokens - 1)
        out[f"{name}_step_s"] = step
        out[f"{name}_share"] = bound / step
    return out


def decode_table(rows: list[dict]) -> str:
    head = ["batch", "prompt", "MB read / step", "bound ms", "engine ms / step", "engine share",
            "HF ms / step", "HF share"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        hf = r["hf_step_s"]
        cells = [r["batch"], r["prompt"], f"{r['step_bytes'] / 1e6:,.1f}", f"{r['bound_s'] * 1e3:.3f}",
                 f"{r['engine_step_s'] * 1e3:.2f}", f"{r['engine_share']:.2f}",
                 f"{hf * 1e3:.2f}" if hf else "-", f"{r['hf_share']:.2f}" if hf else "-"]  # fmt: skip
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)
