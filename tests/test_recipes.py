"""The Makefile's recipes: the exact command lines, and one recipe run end to end on the toy world."""

import json
import subprocess

import datasets

from conftest import ROOT, run_env


def make(*args, timeout=300) -> str:
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=run_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_make_n_reproduce_3b_shows_the_papers_pipeline():
    out = make("-n", "reproduce-3b", "RUNS=/tmp/never-run")
    launch = ".venv/bin/accelerate launch --config_file configs/ddp.yaml --num_processes 8"
    assert (f"{launch} evaluate.py --model Qwen/Qwen2.5-VL-3B-Instruct --data "
            "UCSC-VLAA/MedVLThinker-m23k-tokenized --split train") in out
    assert "--n 16 --temperature 1.0 --max_new_tokens 4096" in out  # pass counts (DESIGN.md 7)
    assert "curate.py filter" in out and "--min_pass 1 --max_pass 7" in out
    assert f"{launch} grpo.py --model Qwen/Qwen2.5-VL-3B-Instruct --data /tmp/never-run/reproduce-3b/filtered" in out
    assert "--data UCSC-VLAA/MedVLThinker-Eval --split test" in out
    assert '--paper "3B RL(m23k)=53.19"' in out
    assert "NUM_GPUS" not in out and "--num_processes 4" in make("-n", "reproduce-3b", "NUM_GPUS=4",
                                                               "RUNS=/tmp/never-run")


def test_reproduce_3b_runs_end_to_end_with_toy_arguments(tiny_model_dir, toy_data_dir, tmp_path):
    """Wiring only, not numbers: the random tiny model passes nothing, so MIN_PASS=0 keeps rows."""
    out = make(
        "reproduce-3b", f"RUNS={tmp_path}", f"QWEN_3B={tiny_model_dir}", f"M23K={toy_data_dir}",
        f"EVAL_DATA={toy_data_dir}", "EVAL_SPLIT=test", "LAUNCH=.venv/bin/python", "MIN_PASS=0",
        "PASS_ARGS=--n 2 --temperature 1.0 --max_new_tokens 4 --batch_size 16 --limit 16",
        "GRPO_ARGS=--rollout_batch_size 4 --mini_batch_size 2 --group_size 2 --max_new_tokens 4 "
        "--max_steps 1 --gradient_checkpointing False --micro_batch_size 8",
        "EVAL_ARGS=--max_new_tokens 4 --batch_size 24")
    run = tmp_path / "reproduce-3b"
    kept = datasets.load_from_disk(str(run / "filtered"))
    assert len(kept) == 16  # the 16 rows with pass counts, every one in [0, 7] with 2 samples
    assert len((run / "grpo" / "metrics.jsonl").read_text().splitlines()) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"grpo"} and summary["grpo"]["benchmarks"]["ToyLesion"]["n"] == 8
    assert "| 3B RL(m23k) (paper) | - | - | - | 53.19 |" in out
    # Every stage's output exists now: a second call runs nothing but the final table.
    again = make("reproduce-3b", f"RUNS={tmp_path}", f"QWEN_3B={tiny_model_dir}", f"M23K={toy_data_dir}",
                 f"EVAL_DATA={toy_data_dir}", "EVAL_SPLIT=test", "LAUNCH=false")
    assert "grpo.py" not in again and "53.19" in again
