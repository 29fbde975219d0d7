"""`python -m shell.report RUN_DIR…`: overlaid validation curves and a table of final values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(run_dir: Path, evals: list[tuple[int, float, float]]) -> Path:
    """A metrics.jsonl with train rows and ``(eval_step, answer_reward, elapsed_s)`` eval rows."""
    run_dir.mkdir(parents=True)
    rows = []
    for step, reward, elapsed in evals:
        rows.append({"train_step": step, "train/loss": 1.0 / (step + 1), "time/elapsed_s": elapsed - 1})
        rows.append({"eval_step": step, "eval/answer_reward": reward, "eval/format_reward": 1.0, "time/elapsed_s": elapsed})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shell.report", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_report_overlays_runs_and_tabulates_first_best_final(tmp_path):
    a = _run(tmp_path / "run_a", [(0, 0.05, 10.0), (5, 0.30, 130.0), (10, 0.25, 250.0)])
    b = _run(tmp_path / "run_b", [(0, 0.05, 12.0), (5, 0.10, 100.0), (10, 0.40, 190.0)])
    out = tmp_path / "cmp.png"
    proc = _report(str(a), str(b), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines() if ln.startswith("run_")}
    # run  evals  first  best  @step  final  @step  minutes
    assert lines["run_a"][1:7] == ["3", "0.050", "0.300", "5", "0.250", "10"]
    assert lines["run_b"][1:7] == ["3", "0.050", "0.400", "10", "0.400", "10"]
    assert lines["run_a"][7] == f"{250 / 60:.1f}"


def test_report_other_metric_and_run_without_evaluations(tmp_path):
    a = _run(tmp_path / "run_a", [(0, 0.0, 1.0), (4, 0.5, 61.0)])
    empty = tmp_path / "run_empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"train_step": 1, "train/loss": 2.0}) + "\n")
    proc = _report(str(a), str(empty), "--metric", "eval/format_reward", "--out", str(tmp_path / "f.png"))
    assert proc.returncode == 0, proc.stderr
    assert "eval/format_reward" in proc.stdout
    assert "(no evaluations)" in proc.stdout
    row = next(ln.split() for ln in proc.stdout.splitlines() if ln.startswith("run_a"))
    assert row[2:4] == ["1.000", "1.000"]


def test_report_missing_run_is_a_clear_error(tmp_path):
    proc = _report(str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert "no metrics.jsonl" in proc.stderr and "nope" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_report_phases_of_a_run_with_warm_start_and_final_evaluation(tmp_path):
    """Hand-worked: warm start until the first evaluation, the loop until its last, then the final evaluation."""
    run = _run(tmp_path / "run_lb", [(0, 0.70, 120.0), (5, 0.80, 300.0)])
    warm = [{"train_step": s, "train/loss": 10.0 / s, "time/elapsed_s": 30.0 * s} for s in (1, 2, 3)]
    (run / "warm_start_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in warm))
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"eval_step": 5, "final/answer_reward": 0.75, "final/num_examples": 500, "time/elapsed_s": 420.0}) + "\n")
        f.write(json.dumps({"eval_step": 5, "final_greedy/answer_reward": 0.9, "time/elapsed_s": 480.0}) + "\n")
    out = tmp_path / "phases.png"
    proc = _report(str(run), "--phases", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.split()[:1] in (["warm"], ["training"], ["final"])]
    # phase  from  to  minutes  steps  result
    assert rows[0] == ["warm", "start", "0.0", "2.0", "2.0", "3", "0.700"]
    assert rows[1] == ["training", "2.0", "5.0", "3.0", "2", "0.800"]
    assert rows[2] == ["final", "evaluation", "5.0", "8.0", "3.0", "0", "0.750", "on", "500", "(greedy", "0.900)"]


def test_report_without_runs_or_without_the_metric_exits_2_and_keeps_the_old_figure(tmp_path):
    proc = _report()
    assert proc.returncode == 2 and "python -m shell.report runs/NAME" in proc.stderr
    old = tmp_path / "old.png"
    old.write_bytes(b"an earlier figure")
    empty = tmp_path / "run_empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"train_step": 1, "train/loss": 2.0}) + "\n")
    proc = _report(str(empty), "--out", str(old))
    assert proc.returncode == 2 and "no eval/answer_reward" in proc.stderr
    assert old.read_bytes() == b"an earlier figure"


def test_report_usage_names_the_module_and_the_figure_goes_under_runs():
    proc = _report("--help")
    assert proc.returncode == 0 and "usage: python -m shell.report" in proc.stdout
    from shell.report import ReportConfig

    assert ReportConfig().out.startswith("runs/")


def test_the_phase_plot_labels_the_loss_axis_within_one_decade(tmp_path, monkeypatch):
    """Losses from 2 to 5 (within one decade, above symlog's linear part: that axis had no tick in view): the
    loss axis shows labelled ticks."""
    import shell.report as report

    run = tmp_path / "run_small"
    run.mkdir()
    rows = [{"train_step": s, "train/loss": 1.5 + 0.5 * s, "time/elapsed_s": 2.0 * s} for s in range(1, 8)]
    rows.append({"eval_step": 7, "eval/answer_reward": 0.3, "time/elapsed_s": 15.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, out, dpi: figures.append(fig))
    report.plot_phases([run], tmp_path / "p.png", "eval/answer_reward")
    loss_axis = figures[0].axes[1]
    figures[0].canvas.draw()
    lo, hi = loss_axis.get_ylim()
    in_view = [(tick, label.get_text()) for minor in (False, True)
               for tick, label in zip(loss_axis.get_yticks(minor=minor), loss_axis.get_yticklabels(minor=minor))
               if lo <= tick <= hi and label.get_text()]
    assert len(in_view) >= 2, in_view


def _evaluation(run_dir: Path, correct: list[list[int]], truths: list[str] | None = None) -> Path:
    """A shell.evaluate folder: ``correct[i][j]`` is sample ``j`` of problem ``i`` right (1) or wrong (0)."""
    from shell.evaluation import EvalResult, summarize, write_results

    truths = truths or [str(i) for i in range(len(correct))]
    records = [{"index": i, "sample": j, "prompt": f"q{i}", "response": "r", "ground_truth": truths[i],
                "format_reward": 1.0, "answer_reward": float(c), "reward": float(c), "num_tokens": 5,
                "mean_token_entropy": None, "finish_reason": "stop", "extracted_answer": truths[i] if c else f"w{j % 2}"}
               for i, samples in enumerate(correct) for j, c in enumerate(samples)]
    write_results(run_dir, EvalResult(records=records, summary=summarize(records, resamples=1000)), {"run": {"seed": 0}})
    return run_dir


def test_report_paired_prints_each_runs_difference_to_the_first(tmp_path):
    """40 problems, k = 4. Run b solves what a solves plus 10 more problems (all 4 samples): pass@1 +0.25,
    an interval excluding 0; run c equals a: difference 0, interval [0, 0], not excluding 0."""
    base = [[1, 1, 0, 0] if i < 10 else [0, 0, 0, 0] for i in range(40)]
    better = [row if i < 10 else ([1, 1, 1, 1] if i < 20 else row) for i, row in enumerate(base)]
    a, b, c = _evaluation(tmp_path / "a", base), _evaluation(tmp_path / "b", better), _evaluation(tmp_path / "c", base)
    out = tmp_path / "p.png"
    proc = _report(str(a), str(b), str(c), "--paired", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "paired difference to a (the same 40 problems" in proc.stdout
    rows = {(ln.split()[0], ln.split()[1]): ln.split() for ln in proc.stdout.splitlines()
            if ln.split()[:1] in (["b"], ["c"]) and len(ln.split()) == 8}
    # run  figure  first  this  diff  [lo,  hi]  excludes
    assert rows[("b", "pass@1")][2:5] == ["0.125", "0.375", "+0.250"] and rows[("b", "pass@1")][-1] == "yes"
    lo, hi = float(rows[("b", "pass@1")][5].strip("[,")), float(rows[("b", "pass@1")][6].strip("]"))
    assert 0 < lo < 0.25 < hi
    assert rows[("b", "pass@4")][4] == "+0.250" and rows[("b", "maj@4")][-1] == "yes"
    assert rows[("c", "pass@1")][4:] == ["+0.000", "[+0.000,", "+0.000]", "no"]
    assert {f for run, f in rows} == {"accuracy", "format_reward", "pass@1", "pass@2", "pass@4", "maj@4"}
    # The evaluations' own table: each figure with its interval.
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("b ") and "pass@4" in ln)
    assert "pass@1 0.375 [" in line and "maj@4" in line


def test_report_names_final_eval_folders_after_their_runs(tmp_path):
    """Two training runs' final_eval/ folders compared directly: each is named by its run, not "final_eval"."""
    a = _evaluation(tmp_path / "run_a" / "final_eval", [[1], [0], [0], [1]])
    b = _evaluation(tmp_path / "run_b" / "final_eval", [[1], [1], [0], [1]])
    proc = _report(str(a), str(b), "--paired", "--out", str(tmp_path / "p.png"))
    assert proc.returncode == 0, proc.stderr
    assert "paired difference to run_a/final_eval (the same 4 problems" in proc.stdout
    assert any(ln.split()[:2] == ["run_b/final_eval", "accuracy"] for ln in proc.stdout.splitlines())


def test_report_paired_refuses_different_problems_and_single_runs(tmp_path):
    a = _evaluation(tmp_path / "a", [[1, 0]] * 5)
    b = _evaluation(tmp_path / "b", [[1, 0]] * 6)
    c = _evaluation(tmp_path / "c", [[1, 0]] * 5, truths=["9"] * 5)
    for args in ((a, b), (a, c), (a,)):
        proc = _report(*map(str, args), "--paired", "--out", str(tmp_path / "x.png"))
        assert proc.returncode == 2, proc.stdout
        assert "same problems" in proc.stderr or "at least two runs" in proc.stderr
        assert not (tmp_path / "x.png").exists()
    train = _run(tmp_path / "train", [(0, 0.1, 1.0)])   # no evaluation folder at all
    proc = _report(str(a), str(train), "--paired", "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "no results.jsonl" in proc.stderr


def test_report_pass_at_k_and_bands(tmp_path):
    k4 = _evaluation(tmp_path / "k4", [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]] * 4)
    k1 = _evaluation(tmp_path / "k1", [[1], [0]])
    out = tmp_path / "pk.png"
    proc = _report(str(k4), str(k1), "--pass-at-k", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("k4 "))
    assert "pass@1 0.417" in line and "pass@4 0.667" in line          # (1/4 + 1 + 0) / 3 ; (1 + 1 + 0) / 3
    proc = _report(str(k1), "--pass-at-k", "--out", str(tmp_path / "none.png"))
    assert proc.returncode == 2 and "more than one sample" in proc.stderr


def test_report_table_gives_the_final_interval_and_groups_seeds(tmp_path):
    runs = []
    for seed, finals in ((0, 0.30), (1, 0.40), (2, 0.50)):
        d = _run(tmp_path / f"grpo_s{seed}", [(0, 0.05, 10.0), (5, finals, 100.0)])
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for r in lines:
            if "eval/answer_reward" in r:
                r["eval/answer_reward_ci_low"] = r["eval/answer_reward"] - 0.05
                r["eval/answer_reward_ci_high"] = r["eval/answer_reward"] + 0.05
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (d / "config.json").write_text(json.dumps({"optim": {"lr": 1e-5}, "run": {"name": d.name, "seed": seed}}))
        runs.append(d)
    other = _run(tmp_path / "other_lr", [(0, 0.05, 10.0), (5, 0.9, 100.0)])
    (other / "config.json").write_text(json.dumps({"optim": {"lr": 1e-4}, "run": {"name": "other_lr", "seed": 0}}))
    out = tmp_path / "g.png"
    proc = _report(*map(str, runs), str(other), "--group-seeds", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    row = next(ln.split() for ln in proc.stdout.splitlines() if ln.startswith("grpo_s1 "))
    assert row[-2:] == ["[0.350,", "0.450]"]                      # the final evaluation's interval
    group = next(ln for ln in proc.stdout.splitlines() if ln.startswith("grpo_s0 +2 (seeds)"))
    # group  seeds  final mean  ± std  min  max  @step
    assert group.split()[3:] == ["3", "0.400", "0.100", "0.300", "0.500", "5"]
    assert next(ln for ln in proc.stdout.splitlines() if ln.startswith("other_lr ") and len(ln.split()) == 7)
