"""Peak extra memory and time of get_response_log_probs(+entropy) vs a naive log_softmax path.

    python benchmarks/bench_logprobs.py [--batch 2 --seq 1024 --vocab 151936 --dtype float32]
    python benchmarks/bench_logprobs.py --small      # (1, 32, 512) logits, seconds (results/logprobs_small.json)

Each variant runs in its own subprocess on a logits tensor that already exists (the model's output),
so "extra" is what the log-prob computation adds on top of it: forward + backward, including the
gradient of the logits (one logits-sized tensor is the floor). On CUDA the peak comes from
torch.cuda.max_memory_allocated, on CPU from the process's peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks.common import print_table, write_json  # noqa: E402


class _Logits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.logits})()


def _naive(logits, labels, entropy: bool):
    log_probs_all = torch.log_softmax(logits.float(), dim=-1)
    out = {"log_probs": log_probs_all.gather(-1, labels[..., None]).squeeze(-1)}
    if entropy:
        out["token_entropy"] = -(log_probs_all.exp() * log_probs_all).sum(-1)
    return out


def _ours(logits, labels, entropy: bool):
    import core

    return core.get_response_log_probs(_Logits(logits), labels, labels, return_token_entropy=entropy)


def _peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(variant: str, batch: int, seq: int, vocab: int, dtype: str, entropy: bool) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    logits = torch.randn(batch, seq, vocab, device=device, dtype=getattr(torch, dtype)).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    fn = _ours if variant == "ours" else _naive
    # Touch the allocator once at a small size so first-use costs are not counted.
    small = fn(logits[:1, :8].detach().clone().requires_grad_(True), labels[:1, :8], entropy)
    small["log_probs"].sum().backward()
    del small
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else _peak_bytes()
    t0 = time.perf_counter()
    out = fn(logits, labels, entropy)
    out["log_probs"].sum().backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    extra = _peak_bytes() - before
    one = logits.numel() * logits.element_size()
    return {"variant": variant, "seconds": seconds, "extra_bytes": extra, "logits_bytes": one,
            "extra_over_logits": extra / one}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--small", action="store_true", help="(1, 32, 512) logits: the code path in seconds (CI)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--entropy", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.small:
        a.batch, a.seq, a.vocab = 1, 32, 512
    if a.child:
        print(json.dumps(child(a.child, a.batch, a.seq, a.vocab, a.dtype, a.entropy)))
        return
    rows = []
    for entropy in (False, True):
        for variant in ("naive", "ours"):
            cmd = [sys.executable, __file__, "--child", variant, "--batch", str(a.batch), "--seq", str(a.seq),
                   "--vocab", str(a.vocab), "--dtype", a.dtype] + (["--entropy"] if entropy else [])
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            res["entropy"] = entropy
            res["extra_GB"] = res["extra_bytes"] / 1e9
            rows.append(res)
    print(f"logits ({a.batch}, {a.seq}, {a.vocab}) {a.dtype}: {rows[0]['logits_bytes'] / 1e9:.2f} GB")
    print_table(rows, ["variant", "entropy", "seconds", "extra_GB", "extra_over_logits"])
    def extra(variant: str, entropy: bool) -> int:
        return next(r for r in rows if r["variant"] == variant and r["entropy"] == entropy)["extra_bytes"]

    # None where the peak did not move (a CPU's peak RSS at the small mode's sizes)
    ratios = {f"memory_naive_over_ours{'_with_entropy' if e else ''}": extra("naive", e) / extra("ours", e) if extra("ours", e) else None
              for e in (False, True)}
    print({k: None if v is None else round(v, 2) for k, v in ratios.items()})
    write_json(f"logprobs_{a.dtype}" + ("_small" if a.small else ""), {"config": vars(a), "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
