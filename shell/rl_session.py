"""What GRPO and expert iteration share around their algorithm: the data (loaded and checked before anything
else), the policy and its sampler, the context filters, entropy scoring of sampled responses, the warm start
or resume, and the tail of every step (sync the sampler once, evaluate or checkpoint as due), then the finish
and the final evaluation.

A loop reads::

    data = load_rl_data(cfg)                                   # phase 0: nothing written or loaded yet
    with Run(cfg, total_steps=n) as run:
        session = RLSession(run, cfg, data, microbatch=m)      # policy, sampler, filters, resume
        session.open()                                         # warm start + evaluation 0, or the resumed weights
        for step in run.steps():
            ...rollout (session.sampler) → score → train (session.learner) → run.log(...)
            session.after_step(step)
        return session.finish()
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from shell.data import (
    Dataset, QuestionSampler, held_out_config, load_dataset, make_curriculum, make_sft_examples, questions_within_context,
    restore_curriculum,
)
from shell.evaluation import final_evaluation, run_eval
from shell.fingerprint import records_fingerprint
from shell.lora import apply_lora, parameter_counts
from shell.loop import Run
from shell.models import prompt_token_limit
from shell.prompts import PromptTemplate, load_prompt
from shell.sampling import build_sampler
from shell.update import Learner, Optimizer, response_entropies, warm_start

__all__ = ["RLData", "RLSession", "load_rl_data"]

T = TypeVar("T")


@dataclass(frozen=True)
class RLData:
    """An RL loop's prompt and problems: training questions, the held-out set (and the sentence saying where it
    comes from), and the final evaluation's set when the loop has one enabled."""

    template: PromptTemplate
    train: Dataset
    held_out: Dataset
    held_note: str
    final: Dataset | None = None

    def fingerprints(self) -> dict[str, dict[str, Any]]:
        """Each set's :func:`shell.fingerprint.records_fingerprint` (``train``, ``held_out``, ``final``), which a
        resume compares with the run's."""
        sets = {"train": self.train, "held_out": self.held_out, **({} if self.final is None else {"final": self.final})}
        return {name: records_fingerprint(records) for name, records in sets.items()}


def load_rl_data(cfg: Any, *, total_steps: int) -> RLData:
    """Phase 0 of an RL loop of ``total_steps`` whose config ``cfg`` has ``prompt``, ``data``, ``eval_data``,
    ``warm_start`` and ``run`` (and optionally ``final_eval``): seed torch, load the prompt and every set, refuse a
    warm start without solutions to make SFT traces from and a ``--data.curriculum`` the data cannot serve; before
    anything is written or a model loads."""
    torch.manual_seed(cfg.run.seed)
    template = load_prompt(cfg.prompt)
    train = load_dataset(cfg.data)
    held_cfg, held_note = held_out_config(cfg.data, cfg.eval_data)
    held_out = load_dataset(held_cfg)
    final_eval = getattr(cfg, "final_eval", None)
    final = (load_dataset(held_out_config(cfg.data, final_eval.data)[0])
             if final_eval is not None and final_eval.enabled else None)
    if cfg.warm_start.steps > 0 and not any(ex.solution is not None for ex in train):
        raise ValueError("--warm-start.steps: the training data has no solutions to make SFT traces from")
    make_curriculum(cfg.data, train, seed=cfg.run.seed, total_steps=total_steps)  # its data errors, early
    return RLData(template=template, train=train, held_out=held_out, held_note=held_note, final=final)


class RLSession:
    """An RL loop's policy (:attr:`learner`, :attr:`model`), its :attr:`sampler` and its data within the model's
    context, attached to ``run`` (resumed from its newest checkpoint when ``--resume``).

    Args:
        run: the entered :class:`shell.loop.Run`.
        cfg: the loop's config (``model``, ``sampler``, ``optim``, ``sampling``, ``eval``, ``grading``,
            ``warm_start``, ``data``; optionally ``final_eval``).
        data: :func:`load_rl_data`'s sets.
        microbatch: responses per microbatch when the policy scores entropies.
        total_steps: the loop's steps (the curriculum's schedule, unless ``--data.curriculum-steps``).
        rounds_per_step: sampling rounds a step may take (dynamic sampling), for the curriculum's uniform streams.
        eval_extra: extra keys logged with every evaluation (called at evaluation time).
    """

    def __init__(self, run: Run, cfg: Any, data: RLData, *, microbatch: int, total_steps: int, rounds_per_step: int = 1,
                 eval_extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.run, self.cfg, self.template = run, cfg, data.template
        self.microbatch = max(1, microbatch)
        self.eval_extra = eval_extra
        self.final_eval = getattr(cfg, "final_eval", None)
        self.model, self.tokenizer, self.sampler = build_sampler(cfg.model, cfg.sampler, seed=cfg.run.seed, training=True)
        self.train_set = self._within_context(data.train, "training questions", cfg.sampling.max_tokens)
        self.eval_set = self._within_context(data.held_out, "held-out set", cfg.eval.max_tokens)
        self.final_set = (None if data.final is None else
                          self._within_context(data.final, "final evaluation set", self.final_eval.sampling.max_tokens))
        self.curriculum: QuestionSampler = make_curriculum(cfg.data, self.train_set, seed=cfg.run.seed,
                                                           total_steps=total_steps, rounds_per_step=rounds_per_step)
        """Which training questions each step takes (``--data.curriculum``); its state rides in ``run.state``."""
        self.model = apply_lora(self.model, cfg.lora)  # after the sampler's generation copy: that stays a plain model
        self.learner = Learner(self.model, self.tokenizer, cfg.optim)
        rl = self.learner.optimizer
        self._fresh_optimizer = (copy.deepcopy(rl.optimizer.state_dict()), copy.deepcopy(rl.scheduler.state_dict()))
        """The RL optimizer as it starts (no state yet): what it returns to after a resume mid-warm-start, whose
        checkpoint holds the warm start's own optimizer."""
        run.begin(self.learner, closing=[self.sampler.close])
        if not run.resumed:
            run.log(parameter_counts(self.model))  # the first record: what trains (no step: kept by every resume)
        if run.start > 0 and (note := restore_curriculum(self.curriculum, run.state.get("curriculum"))):
            run.say(note)
        if cfg.data.curriculum != "none":
            run.say(f"training problems: {self.curriculum.describe()}")

    def record_curriculum(self, state: dict[str, Any] | None = None) -> None:
        """After the curriculum observed a step's pass rates: its state goes into the step's checkpoint (``state``:
        the one taken when the step's batch was made, with asynchronous rollouts; None: the curriculum's now)."""
        self.run.state["curriculum"] = self.curriculum.state_dict() if state is None else state

    def _within_context(self, dataset: Dataset, what: str, reserve: int) -> Dataset:
        limit = prompt_token_limit(self.model, reserve=reserve, max_prompt_tokens=self.cfg.data.max_prompt_tokens)
        return questions_within_context(dataset, self.template, self.tokenizer, what=what, limit=limit)

    def entropy_at(self, temperature: float) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
        """Scores each response's mean token entropy under the policy at ``temperature`` (of ``softmax(logits / T)``;
        greedy, T = 0: the model's own distribution), where the sampler gives none (vLLM)."""
        def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
            return response_entropies(self.learner, prompts, responses, microbatch=self.microbatch,
                                      temperature=temperature if temperature > 0 else 1.0)
        return score

    def entropy(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Each rollout's mean token entropy at the rollout temperature (``--sampling.temperature``)."""
        return self.entropy_at(self.cfg.sampling.temperature)(prompts, responses)

    def open(self, prepare: Callable[[bool], T] | None = None) -> T | None:
        """A fresh run: the SFT warm start (``--warm-start.steps``), ``prepare(True)``, the evaluation of step 0.
        A resumed one: ``prepare(False)``, and the sampler gets the restored policy. Returns what ``prepare``
        returned (the loop's own start-up, e.g. GRPO's KL reference)."""
        fresh = self.run.start == 0
        if fresh:
            self._warm_start()
        prepared = prepare(fresh) if prepare is not None else None
        self.sampler.load_weights(self.model)
        if fresh and not self.run.state.get("evaluated_0"):  # a resume at step 0 after it: it is logged already
            self.evaluate(0)
            self.run.state["evaluated_0"] = True
        return prepared

    def _warm_start(self) -> None:
        """The SFT warm start inside the run's lifecycle: after each step a signal checkpoints it (step 0, with the
        warm start's own AdamW and its step in :attr:`Run.state`) and exits; ``--resume`` continues from that step.
        With ``--budget-hours`` it ends early when another step would pass its share (``--warm-start.budget-share``)."""
        cfg, run = self.cfg.warm_start, self.run
        done = int(run.state.get("warm_start_step", 0))
        if cfg.steps <= 0 or run.state.get("warm_start_ended"):
            return
        optimizer = Optimizer(self.model, self.learner.optim, lr=cfg.lr)
        if done > 0:  # the checkpoint held the warm start's AdamW in the RL optimizer's place: move it back
            rl = self.learner.optimizer
            optimizer.optimizer.load_state_dict(rl.optimizer.state_dict())
            optimizer.scheduler.load_state_dict(rl.scheduler.state_dict())
            rl.optimizer.load_state_dict(self._fresh_optimizer[0])
            rl.scheduler.load_state_dict(self._fresh_optimizer[1])
            run.say(f"warm start: continuing after step {done} of {cfg.steps}")
        seconds: list[float] = []

        def after_step(step: int, took: float) -> bool:
            run.state["warm_start_step"] = step
            run.schedule.doing = f"warm-start step {step + 1}"
            run.stop_if_signalled(0, optimizer=optimizer)
            seconds.append(took)
            if step < cfg.steps and run.schedule.over_share(cfg.budget_share, statistics.median(seconds)):
                run.say(f"--budget-hours {run.loop.budget_hours:g}: warm start ends after step {step} of {cfg.steps} "
                        f"(its share, {cfg.budget_share:g} of the budget, is used: {run.elapsed / 60:.1f} min)")
                return False
            return True

        last = warm_start(self.learner, make_sft_examples(self.train_set, self.template), cfg, seed=self.cfg.run.seed,
                          run_dir=run.dir, optimizer=optimizer, start=done, after_step=after_step)
        run.state["warm_start_ended"] = True  # done, or ended by the budget: a resume does not go on with it
        run.state["warm_start_step"] = last
        run.schedule.doing = None

    def evaluate(self, step: int) -> dict[str, Any]:
        """The held-out evaluation at ``step`` (the sampler holds the policy's weights); with a final evaluation
        ahead, it also keeps room for it in ``--budget-hours``, scaled from this one's time."""
        m = run_eval(self.run, self.sampler, self.model, self.eval_set, template=self.template, sampling=self.cfg.eval,
                     grading=self.cfg.grading, step=step, extra=self.eval_extra() if self.eval_extra else None,
                     entropy=self.entropy_at(self.cfg.eval.temperature))
        if self.final_set is not None:  # the final evaluation, plus the last checkpoint and final/ (a margin)
            passes = 2 if self.final_eval.greedy else 1
            self.run.reserve_s = 1.15 * m["eval/seconds"] / max(1, len(self.eval_set)) * len(self.final_set) * passes + 30
            self.run.state["reserve_s"] = self.run.reserve_s  # kept across a resume
        return m

    def after_step(self, step: int) -> None:
        """The tail of every step: the sampler gets the updated policy (once), then the evaluation and the
        checkpoint when due."""
        self.sampler.load_weights(self.model)
        if self.run.eval_due(step):
            self.evaluate(step)
        self.run.checkpoint_if_due(step)

    def finish(self) -> Path:
        """The run's finish (last checkpoint, ``final/``, figures), then the final evaluation when enabled;
        returns the run folder."""
        folder = self.run.finish()
        if self.final_set is not None:
            with self.run.final_phase():  # a signal stops it at once; --resume redoes it
                final_evaluation(self.run, self.sampler, self.model, self.final_set, template=self.template,
                                 cfg=self.final_eval, grading=self.cfg.grading,
                                 entropy=self.entropy_at(self.final_eval.sampling.temperature))
        return folder
