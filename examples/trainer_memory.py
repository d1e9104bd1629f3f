"""Peak memory of one trainer forward + backward against sequence length, at Qwen3's real vocabulary.

A narrow Qwen3 (hidden 64, 2 layers, vocabulary 151,936) so nearly all memory is the trainer's
log-prob computation. `full` is the old way (fp32 logits, log-softmax and entropy over [L, V]);
`chunked` is the trainer's (`npr.modeling.topology_token_stats`). Each measurement runs in its own
process (peak RSS cannot be reset), on the CPU, 2 threads.

    python examples/trainer_memory.py --lengths 4096 8192
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def measure(length: int, how: str) -> float:
    """Peak RSS (GiB) of one forward + backward of a `length`-token sequence."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from npr.modeling import topology_forward, topology_token_stats
    from npr.tags import TAGS
    from npr.topology import collate

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=length + 8)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(cfg)
    tags = {t: 151900 + i for i, t in enumerate(TAGS)}  # ids the random sequence never uses
    ids, topo = collate([(torch.randint(0, 151000, (length,)).tolist(), 16)], tags)
    if how == "full":
        logp_all = torch.log_softmax(topology_forward(model, ids, topo).logits[:, :-1].float(), -1)
        logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
        with torch.no_grad():
            (-(logp_all.exp() * logp_all).sum(-1)).sum()
    else:
        logp = topology_token_stats(model, ids, topo)[..., 0]
    logp.sum().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--one", nargs=2, metavar=("LENGTH", "HOW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(measure(int(args.one[0]), args.one[1]))
        return
    print("| tokens | full logits: peak RSS GiB | chunked through the head: peak RSS GiB |")
    print("|---|---|---|")
    for length in args.lengths:
        peaks = [
            float(
                subprocess.run(
                    [sys.executable, __file__, "--one", str(length), how], check=True, capture_output=True, text=True
                ).stdout.split()[-1]
            )  # fmt: skip
            for how in ("full", "chunked")
        ]
        print(f"| {length:,} | {peaks[0]:.2f} | {peaks[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
