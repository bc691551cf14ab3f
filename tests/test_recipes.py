"""The Makefile's recipes: the exact command lines, and one recipe run end to end on the toy world."""

import json
import re
import shlex
import subprocess

import datasets
import pytest

from conftest import ROOT, run_env


def make(*args, timeout=300) -> str:
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=run_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_make_n_reproduce_3b_shows_the_papers_pipeline():
    out = make("-n", "reproduce-3b", "RUNS=/tmp/never-run")
    # Training recipes run every stage under FSDP2 (TRAIN_CONFIG; evaluate.py does not wrap its model).
    launch = ".venv/bin/accelerate launch --config_file configs/fsdp.yaml --num_processes 8"
    assert (f"{launch} evaluate.py --model Qwen/Qwen2.5-VL-3B-Instruct --data "
            "UCSC-VLAA/MedVLThinker-m23k-tokenized --split train") in out
    assert "--n 16 --temperature 1.0 --max_new_tokens 4096" in out  # pass counts (docs/method.md section 7)
    assert "curate.py filter" in out and "--min_pass 1 --max_pass 7" in out
    assert f"{launch} grpo.py --model Qwen/Qwen2.5-VL-3B-Instruct --data /tmp/never-run/reproduce-3b/filtered" in out
    assert "--data UCSC-VLAA/MedVLThinker-Eval --split test" in out
    assert '--paper "3B RL(m23k)=53.19"' in out
    assert grpo_flags(out)["--resume"] == "latest"  # always: grpo.py starts afresh without a checkpoint
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


# The MedVLSynther models (docs/recipes.md), written from the official scripts of
# github.com/UCSC-VLAA/MedVLSynther, train/<size>_biomedica_webdataset_<SCRIPT>.sh:
# train_batch_size -> --rollout_batch_size, ppo_mini_batch_size -> --mini_batch_size,
# n_gpus_per_node -> --num_processes; paper averages from the paper's Tables 2-4.
QV = "glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k"
SYNTHER = [
    # target, hub data set, prompts per step, mini-batch, GPUs, paper row, official script (abridged)
    ("synther-3b-1k", "MedSynVQA-1K", 32, 16, 4, "3B RL(MedSynVQA-1K)=52.64", f"3b {QV}_subset1k_grpo_4a100"),
    ("synther-3b-2k", "MedSynVQA-2K", 32, 16, 4, "3B RL(MedSynVQA-2K)=54.87", f"3b {QV}_subset2k_grpo_4a100"),
    ("synther-3b-5k", "MedSynVQA-5K", 48, 24, 8, "3B RL(MedSynVQA-5K)=55.85", f"3b {QV}_subset5k_grpo_8a100"),
    ("synther-3b-10k", "MedSynVQA-10K", 32, 16, 4, "3B RL(MedSynVQA-10K)=55.03", f"3b {QV}_subset10k_grpo_4a100"),
    ("synther-3b-13k", "MedSynVQA-13K", 64, 32, 8, "3B RL(MedSynVQA-13K)=55.17", f"3b {QV}_grpo_8a100"),
    ("synther-3b-5k-glm-glm", "MedSynVQA-5K-glm-glm", 32, 16, 4, "3B RL(MedSynVQA-5K-glm-glm)=54.59",
     "3b glm_generated_glm_verified_..._subset5k_grpo_4a100"),
    ("synther-3b-5k-qwen-glm", "MedSynVQA-5K-qwen-glm", 32, 16, 4, "3B RL(MedSynVQA-5K-qwen-glm)=53.93",
     "3b qwen_generated_glm_verified_..._subset5k_grpo_4a100"),
    ("synther-3b-5k-internvl-glm", "MedSynVQA-5K-internvl-glm", 32, 16, 4,
     "3B RL(MedSynVQA-5K-internvl-glm)=55.20", "3b internvl_generated_glm_verified_..._subset5k_grpo_4a100"),
    ("synther-3b-5k-no-verify", "MedSynVQA-5K-no-verify", 32, 16, 4, "3B RL(MedSynVQA-5K-no-verify)=54.72",
     "3b glm_generated_glm_verified_..._without_verifier_subset5k_grpo_4a100"),
    ("synther-3b-5k-pmc-style", "MedSynVQA-5K-PMC-style", 32, 16, 4, "3B RL(MedSynVQA-5K-PMC-style)=54.80",
     "3b glm_generated_pmc_..._subset5k_grpo_4a100"),
    ("synther-7b-1k", "MedSynVQA-1K", 48, 24, 8, "7B RL(MedSynVQA-1K)=54.96", f"7b {QV}_subset1k_grpo_8a100"),
    ("synther-7b-2k", "MedSynVQA-2K", 48, 24, 8, "7B RL(MedSynVQA-2K)=56.96", f"7b {QV}_subset2k_grpo_8a100"),
    ("synther-7b-5k", "MedSynVQA-5K", 48, 24, 8, "7B RL(MedSynVQA-5K)=57.56", f"7b {QV}_subset5k_grpo_8a100"),
    ("synther-7b-10k", "MedSynVQA-10K", 48, 24, 8, "7B RL(MedSynVQA-10K)=57.48", f"7b {QV}_subset10k_grpo_8a100"),
    ("synther-7b-13k", "MedSynVQA-13K", 64, 32, 8, "7B RL(MedSynVQA-13K)=58.15", f"7b {QV}_grpo_8a100"),
    # The script sets no ppo_mini_batch_size: 24 as in every other 7B script at 48 prompts per step.
    ("synther-7b-5k-glm-glm", "MedSynVQA-5K-glm-glm", 48, 24, 8, "7B RL(MedSynVQA-5K-glm-glm)=58.08",
     "7b glm_generated_glm_verified_..._subset5k_grpo_8a100"),
    ("synther-7b-5k-qwen-glm", "MedSynVQA-5K-qwen-glm", 48, 24, 8, "7B RL(MedSynVQA-5K-qwen-glm)=56.42",
     "7b qwen_generated_glm_verified_..._subset5k_grpo_8a100"),
    ("synther-7b-5k-internvl-glm", "MedSynVQA-5K-internvl-glm", 48, 24, 8,
     "7B RL(MedSynVQA-5K-internvl-glm)=57.78", "7b internvl_generated_glm_verified_..._subset5k_grpo_8a100"),
    ("synther-7b-5k-no-verify", "MedSynVQA-5K-no-verify", 48, 24, 8, "7B RL(MedSynVQA-5K-no-verify)=57.33",
     "7b glm_generated_glm_verified_..._without_verifier_subset5k_grpo_8a100"),
    ("synther-7b-5k-pmc-style", "MedSynVQA-5K-PMC-style", 48, 24, 8, "7B RL(MedSynVQA-5K-PMC-style)=55.15",
     "7b glm_generated_pmc_..._subset5k_grpo_8a100"),
]


def grpo_flags(out: str) -> dict:
    """grpo.py's flags on its `make -n` line, the last of a repeated flag winning (as argparse)."""
    lines = [line for line in out.replace("\\\n", " ").splitlines() if " grpo.py " in line]
    assert len(lines) == 1, out
    words = shlex.split(lines[0].split(" grpo.py ", 1)[1])
    flags = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            flags[word] = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
    flags["--num_processes"] = re.search(r"--num_processes (\d+) grpo\.py", lines[0]).group(1)
    return flags


def test_every_medvlsynther_target_is_in_the_table():
    makefile = (ROOT / "Makefile").read_text()
    assert set(re.findall(r"^\$\(eval \$\(call synther,([^,]+),", makefile, re.M)) == {row[0] for row in SYNTHER}


@pytest.mark.parametrize("target,data,batch,mini,gpus,paper,script", SYNTHER, ids=[row[0] for row in SYNTHER])
def test_make_n_medvlsynther(target, data, batch, mini, gpus, paper, script):
    out = make("-n", target, "RUNS=/tmp/never-run")
    flags = grpo_flags(out)
    size = target.split("-")[1].upper()
    assert flags["--model"] == f"Qwen/Qwen2.5-VL-{size}-Instruct"
    assert flags["--data"] == f"MedVLSynther/{data}" and flags["--split"] == "train"
    assert "curate.py" not in out and "passcounts" not in out  # MedSynVQA is curated already
    assert (flags["--rollout_batch_size"], flags["--mini_batch_size"]) == (str(batch), str(mini)), script
    assert flags["--num_processes"] == str(gpus), script
    # The same in every official script: rollout n 8, lr 1e-6, k3 KL loss 0.01, 4096-token responses,
    # no prompt dropped (max_prompt_length 80000), 1 epoch.
    assert (flags["--group_size"], flags["--learning_rate"], flags["--beta"], flags["--max_new_tokens"],
            flags["--max_prompt_length"], flags["--epochs"]) == ("8", "1e-6", "0.01", "4096", "80000", "1")
    assert flags["--resume"] == "latest"
    assert f'--paper "{paper}"' in out


def test_medvlsynther_num_gpus_override_and_alias():
    assert grpo_flags(make("-n", "synther-3b-1k", "NUM_GPUS=8", "RUNS=/tmp/never-run"))["--num_processes"] == "8"
    out = make("-n", "reproduce-synther-3b", "RUNS=/tmp/never-run")
    assert grpo_flags(out)["--data"] == "MedVLSynther/MedSynVQA-5K" and '--paper "3B RL(MedSynVQA-5K)=55.85"' in out
