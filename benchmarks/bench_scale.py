"""The laptop GRPO step at world size 1 vs N under torchrun: steps/s and where the time goes.

    python benchmarks/bench_scale.py [--world-sizes 1 2] [--steps 4] [--out scale]
    python benchmarks/bench_scale.py --small        # a tiny random model, 4 rollouts of 4 tokens, 2 steps (seconds)

World size 1 is a plain process with every core (today's ``python -m shell.grpo``); world size N runs under
``torchrun --standalone --nproc-per-node N`` with ``OMP_NUM_THREADS`` = cores / N per rank (1 on the 2-core
laptop), FSDP2 over gloo on CPU and NCCL on GPUs (the same command on a multi-GPU machine measures scaling:
``--world-sizes 1 2 4 8``).

A step is the GRPO loop's, with the laptop preset's settings (SmolLM2-135M-Instruct, 8 questions × G 8 of the
embedded task, ≤ 48 tokens, 8 microbatches of one group each, bf16 autocast, shared prompt prefix), timed in
phases with a barrier between them (so each phase's time is its slowest rank's):

* ``sample``: the rollouts (each rank samples its share of the questions with its own sampler; all gathered),
* ``grade``: grading (each rank grades its share) and the group advantages,
* ``train``: the policy-gradient update (each rank runs 8 / N microbatches; FSDP all-gathers each layer for a
  microbatch's forward and reduce-scatters its gradients after the backward), clip and AdamW,
* ``sync``: the new weights into the sampler (under torchrun a gathered full state dict).

Also per world size: ``gather_s``, one all-gather of the whole policy (what each microbatch's forward waits
for at most), and the microbatches per rank. The first step of each run (sampler and grader warm-up) is
dropped; the table gives medians over the rest. Results go to benchmarks/results/<out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("sample", "grade", "train", "sync")


def measure(steps: int, out: Path, small_model: str | None = None) -> None:
    """Run ``steps`` GRPO steps of the laptop preset in this process (one rank of a torchrun job, or alone) and
    write the per-step phase times (rank 0). ``small_model``: that tiny model folder, 2 questions × G 2 of at
    most 4 tokens, 2 microbatches (the small mode)."""
    import torch

    from core import group_normalized_advantages
    from shell import grpo
    from shell.config import ModelConfig, SamplingConfig, WarmStartConfig
    from shell.data import load_dataset
    from shell.fsdp import gathered
    from shell.prompts import load_prompt
    from shell.rollout import grade, rollout
    from shell.sampling import build_sampler
    from shell.seeds import batch_indices, derive_seed
    from shell.update import Learner, grpo_update
    from shell.world import barrier, init_world, is_main

    world = init_world()
    cfg = replace(grpo.PRESETS["laptop"][1], warm_start=WarmStartConfig(steps=0))
    if small_model is not None:
        cfg = replace(cfg, model=ModelConfig(name_or_path=small_model), rollout_batch_size=4, group_size=2,
                      train_batch_size=4, gradient_accumulation_steps=2, sampling=replace(cfg.sampling, max_tokens=4))
    torch.manual_seed(0)
    template = load_prompt(cfg.prompt)
    train_set = load_dataset(cfg.data)
    model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=0, training=True)
    learner = Learner(model, tokenizer, cfg.optim)
    settings = grpo.pg_settings(cfg)
    n_questions = cfg.rollout_batch_size // cfg.group_size
    rows = []
    try:
        for step in range(1, steps + 1):
            idx = batch_indices(len(train_set), n_questions, step - 1, seed=0)
            marks = [time.perf_counter()]
            model.eval()
            rollouts = rollout(sampler, [train_set[i] for i in idx], template, cfg.sampling, group_size=cfg.group_size,
                               seed=derive_seed(0, "rollout", step), keys=idx, progress=False)
            barrier()
            marks.append(time.perf_counter())
            scores, _ = grade(rollouts, template, cfg.grading, progress=False)
            advantages, raw, stats = group_normalized_advantages(scores, group_size=cfg.group_size,
                                                                 advantage_eps=cfg.advantage_eps,
                                                                 normalize_by_std=cfg.use_std_normalization)
            barrier()
            marks.append(time.perf_counter())
            update = grpo_update(learner, rollouts, raw, advantages, settings, seed=step)[-1]
            barrier()
            marks.append(time.perf_counter())
            sampler.load_weights(model)
            barrier()
            marks.append(time.perf_counter())
            row = {f"{p}_s": b - a for p, a, b in zip(PHASES, marks, marks[1:])}
            row.update(step_s=marks[-1] - marks[0], tokens=sum(rollouts.num_tokens), loss=update["train/loss"],
                       reward=stats["reward_mean"])
            rows.append(row)
            if is_main():
                print(f"[world size {world.size}] step {step}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        gathers = []
        for _ in range(3):
            barrier()
            t0 = time.perf_counter()
            with gathered(learner.model):
                pass
            barrier()
            gathers.append(time.perf_counter() - t0)
    finally:
        sampler.close()
    if is_main():
        out.write_text(json.dumps({"world_size": world.size, "threads": torch.get_num_threads(), "steps": rows,
                                   "gather_s": statistics.median(gathers) if world.size > 1 else 0.0,
                                   "microbatches_per_rank": cfg.gradient_accumulation_steps // world.size}))


def launch(world_size: int, steps: int, out: Path, small_model: str | None = None) -> dict:
    """One world size in its own subprocess(es); its measurements."""
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // world_size))}
    script = [str(Path(__file__).resolve()), "--worker", "--steps", str(steps), "--worker-out", str(out),
              *(["--small-model", small_model] if small_model else [])]
    if world_size == 1:
        env.pop("OMP_NUM_THREADS")  # today's single process: torch's own choice (every core)
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size), *script]
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per world size (the first is a warm-up)")
    p.add_argument("--out", default="scale")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--small", action="store_true", help="a tiny random model, 4 rollouts of 4 tokens, 2 steps (CI)")
    p.add_argument("--small-model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        measure(a.steps, a.worker_out, a.small_model)
        return

    from benchmarks.common import print_table, tiny_model_folder, write_json

    runs, table = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        small_model = None
        if a.small:
            small_model, a.steps, a.out = str(tiny_model_folder(Path(tmp) / "tiny")), 2, a.out + "_small"
        for n in a.world_sizes:
            runs[n] = launch(n, a.steps, Path(tmp) / f"ws{n}.json", small_model)
    for n, run in runs.items():
        kept = run["steps"][1:] or run["steps"]
        row: dict[str, object] = {"world size": n, "threads/rank": run["threads"],
                                  "microbatches/rank": run["microbatches_per_rank"]}
        for key in ("step_s", *(f"{p}_s" for p in PHASES)):
            row[key] = statistics.median(r[key] for r in kept)
        row["steps/s"] = 1.0 / row["step_s"]  # type: ignore[operator]
        row["speed-up"] = row["steps/s"] / table[0]["steps/s"] if table else 1.0  # type: ignore[operator]
        row["gather_s"] = run["gather_s"]
        row["tokens/step"] = statistics.median(r["tokens"] for r in kept)
        table.append(row)
    print_table(table, list(table[0]))
    write_json(a.out, {"steps_per_world_size": a.steps, "rows": table, "runs": {str(n): r for n, r in runs.items()}})


if __name__ == "__main__":
    main()
