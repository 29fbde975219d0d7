"""Eager vs torch.compile'd microbatch train steps (SFT and GRPO) at several (batch, seq) sizes.

    python benchmarks/bench_steps.py [--sizes 4x128 8x256] [--hidden 256 --layers 4 --vocab 151936]
    python benchmarks/bench_steps.py --model smollm2 --sizes 8x160 [--bf16]
    python benchmarks/bench_steps.py --small         # a 1-layer toy, eager only, seconds (results/steps_<device>_small.json)

A step is the shell's ``make_train_step``: forward, chunked log-probs, the objective, backward
(the optimizer update is excluded: it is the same for both). The model is a random Qwen2-style
decoder built from a config (a wide vocabulary, as Qwen2.5's), or with ``--model smollm2`` the
default small real model (30 narrow layers, vocab 49152: the laptop presets' training shape). On a
GPU, or with ``--bf16``, steps run in bf16 autocast. Compile time is reported apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import print_table, timeit, write_json  # noqa: E402
from core import ObjectiveSettings  # noqa: E402
from shell import make_train_step  # noqa: E402
from shell.steps import PolicyGradientTensors  # noqa: E402


def build_model(hidden: int, layers: int, vocab: int, device: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(1, hidden // 64)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["4x128", "8x256"], help="BATCHxSEQ")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", choices=["random", "smollm2"], default="random")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU too (always on a GPU)")
    p.add_argument("--small", action="store_true", help="hidden 64, 1 layer, vocab 512, 2x16, eager only (CI; compiling "
                                                         "takes minutes on a CPU and tests/test_steps.py covers it)")
    a = p.parse_args()
    if a.small:
        a.sizes, a.hidden, a.layers, a.vocab, a.repeats, a.model = ["2x16"], 64, 1, 512, 1, "random"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.model == "smollm2":
        from shell.models import load_policy

        model, _ = load_policy("smollm2", device=device)
        a.vocab = model.config.vocab_size
    else:
        model = build_model(a.hidden, a.layers, a.vocab, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" or a.bf16)
    rows = []
    for objective in ("sft", "grpo"):
        steps = {"eager": make_train_step(model, objective)}
        if not a.small:
            steps["compiled"] = make_train_step(model, objective, compile=True)
        for size in a.sizes:
            b, s = (int(x) for x in size.split("x"))
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, a.vocab, (b, s), generator=g).to(device)
            labels = torch.randint(0, a.vocab, (b, s), generator=g).to(device)
            mask = torch.zeros(b, s, dtype=torch.bool, device=device)
            mask[:, s // 4 :] = True
            if objective == "sft":
                kwargs = {"gradient_accumulation_steps": 1}
            else:
                kwargs = {"settings": ObjectiveSettings(loss_type="grpo_clip", cliprange=0.2),
                          "tensors": PolicyGradientTensors(advantages=torch.randn(b, 1, generator=g).to(device),
                                                           old_log_probs=-torch.rand(b, s, generator=g).to(device))}
            row: dict[str, object] = {"objective": objective, "batch": b, "seq": s}
            for name, step in steps.items():
                def run(step=step):
                    with autocast:
                        step(ids, labels, mask, **kwargs)
                    model.zero_grad(set_to_none=True)

                t0 = time.perf_counter()
                run()  # first call: compilation for the compiled step
                row[f"{name}_first_s"] = time.perf_counter() - t0
                row[f"{name}_s"] = timeit(run, warmup=1, repeats=a.repeats)["median_s"]
            row["speedup"] = row["eager_s"] / row["compiled_s"] if "compiled_s" in row else None
            rows.append(row)
            print_table([row], list(row))
    print()
    print_table(rows, ["objective", "batch", "seq", "eager_s", "compiled_s", "speedup", "compiled_first_s"])
    name = f"steps_{device}" + ("" if a.model == "random" else f"_{a.model}") + ("_bf16" if a.bf16 and device == "cpu" else "")
    name += "_small" if a.small else ""
    write_json(name, {"config": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
