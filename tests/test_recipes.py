"""The Makefile's recipes: the exact command lines (with the settings file each names first, read as
the stage reads it), and one recipe run end to end on the toy world."""

import json
import re
import shlex
import subprocess
from dataclasses import asdict
from types import SimpleNamespace

import datasets
import pytest

import curate
import engine
import evaluate
import grpo
import runtime
import sft
import synth
from conftest import ROOT, run_env

# Each stage's argument classes, as its main parses them.
ARGS = {"evaluate.py": (evaluate.Args,),
        "grpo.py": (grpo.Args, engine.EngineArgs, runtime.RunArgs, runtime.GuardArgs),
        "sft.py": (sft.Args, runtime.RunArgs)}


def make(*args, timeout=300) -> str:
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=run_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def stage_commands(out: str, script: str) -> list[list[str]]:
    """The arguments of every `make -n` line that runs `script` (not --compare), in order."""
    lines = [line for line in out.replace("\\\n", " ").splitlines() if f" {script} " in line
             and not line.lstrip().startswith(("echo", "#")) and "--compare" not in line]
    return [shlex.split(line.split(f" {script} ", 1)[1]) for line in lines]


def stage_args(argv: list[str], script: str):
    """What the stage runs with: its own argument classes over its command line, the settings file
    the line names first included (runtime.parse_args, as the stage parses), flags overriding the
    file; the fields of all its classes in one namespace (a field name is in one class only)."""
    if script == "curate.py":
        return runtime.parse_args(curate.COMMANDS[argv[0]][0], argv=absolute_config(argv[1:]))
    parsed = runtime.parse_args(*ARGS[script], argv=absolute_config(argv))
    fields = {}
    for obj in parsed if isinstance(parsed, tuple) else (parsed,):
        assert not set(fields) & set(asdict(obj)), set(fields) & set(asdict(obj))
        fields.update(asdict(obj))
    return SimpleNamespace(**fields)


def absolute_config(argv: list[str]) -> list[str]:
    """The settings file named relative to the Makefile's folder, as make runs the stage there."""
    if argv and argv[0].endswith(".yaml"):
        return [str(ROOT / argv[0]), *argv[1:]]
    return argv


def test_make_n_reproduce_3b_shows_the_papers_pipeline():
    out = make("-n", "reproduce-3b", "RUNS=/tmp/never-run")
    # Training recipes run every stage under FSDP2 (TRAIN_CONFIG; evaluate.py does not wrap its model).
    launch = ".venv/bin/accelerate launch --config_file configs/fsdp.yaml --num_processes 8"
    assert (f"{launch} evaluate.py configs/passcount.yaml --model Qwen/Qwen2.5-VL-3B-Instruct --data "
            "UCSC-VLAA/MedVLThinker-m23k-tokenized --split train") in out
    passes, evaluation = [stage_args(argv, "evaluate.py") for argv in stage_commands(out, "evaluate.py")]
    # Pass counts (docs/method.md section 7): 16 samples at T 1.0, top_p 1.0, up to 4096 new tokens.
    assert (passes.n, passes.temperature, passes.top_p, passes.max_new_tokens) == (16, 1.0, 1.0, 4096)
    assert passes.split == "train" and passes.output_dir == "/tmp/never-run/reproduce-3b/passcounts"
    (filtering,) = [stage_args(argv, "curate.py") for argv in stage_commands(out, "curate.py")]
    assert (filtering.min_pass, filtering.max_pass, filtering.shuffle, filtering.seed) == (1, 7, True, 42)
    assert (f"{launch} grpo.py configs/grpo_m23k.yaml --model Qwen/Qwen2.5-VL-3B-Instruct "
            "--data /tmp/never-run/reproduce-3b/filtered") in out
    # Greedy evaluation, up to 4096 new tokens, on the six benchmarks (docs/method.md section 8).
    assert (evaluation.temperature, evaluation.n, evaluation.max_new_tokens) == (0.0, 1, 4096)
    assert (evaluation.data, evaluation.split) == ("UCSC-VLAA/MedVLThinker-Eval", "test")
    assert '--paper "3B RL(m23k)=0.5319"' in out
    # GRPO (docs/method.md section 5): 256 prompts x 8 samples, mini-batch 128, lr 1e-6, beta 0.01,
    # 5 epochs; validation every 25 steps on 400 items of the evaluation set.
    (argv,) = stage_commands(out, "grpo.py")
    args = stage_args(argv, "grpo.py")
    assert (args.rollout_batch_size, args.group_size, args.mini_batch_size, args.learning_rate, args.beta,
            args.num_epochs, args.max_new_tokens, args.max_prompt_length) == (
        256, 8, 128, 1e-6, 0.01, 5, 4096, 2048)
    assert (args.eval_every, args.eval_data, args.eval_split, args.eval_limit) == (
        25, "UCSC-VLAA/MedVLThinker-Eval", "test", 400)
    assert args.resume == "latest"  # always: grpo.py starts afresh without a checkpoint
    assert "NUM_GPUS" not in out and "--num_processes 4" in make("-n", "reproduce-3b", "NUM_GPUS=4",
                                                               "RUNS=/tmp/never-run")


def test_make_n_reproduce_3b_pmc_and_sft():
    out = make("-n", "reproduce-3b-pmc", "RUNS=/tmp/never-run")
    (argv,) = stage_commands(out, "grpo.py")
    assert argv[0] == "configs/grpo_pmc.yaml"
    args = stage_args(argv, "grpo.py")
    assert (args.num_epochs, args.rollout_batch_size, args.mini_batch_size, args.learning_rate) == (
        1, 256, 128, 1e-6)
    assert args.data == "/tmp/never-run/reproduce-3b-pmc/filtered"
    out = make("-n", "reproduce-3b-sft", "RUNS=/tmp/never-run")
    (argv,) = stage_commands(out, "sft.py")
    assert argv[0] == "configs/sft_pmc.yaml"
    args = stage_args(argv, "sft.py")
    # docs/method.md section 6: lr 1e-5, 5% warmup, weight decay 1e-4, betas (0.9, 0.95), global batch
    # 16; the released checkpoint is from epoch 3.
    assert (args.learning_rate, args.warmup_ratio, args.weight_decay, args.adam_beta1, args.adam_beta2,
            args.global_batch_size, args.num_epochs) == (1e-5, 0.05, 1e-4, 0.9, 0.95, 16, 3)
    assert args.model == "Qwen/Qwen2.5-VL-3B-Instruct" and args.resume == "latest"
    assert args.data == "UCSC-VLAA/MedVLThinker-pmc_vqa-gpt_4o_reasoning-tokenized"


@pytest.mark.parametrize("config", ["grpo_m23k", "grpo_pmc", "grpo_synther", "sft_pmc", "eval", "passcount"])
def test_every_settings_file_holds_only_settings_of_its_stage(config):
    """runtime.parse_args refuses a key the stage does not have (a renamed flag, a typo)."""
    script = {"grpo": "grpo.py", "sft": "sft.py"}.get(config.split("_")[0], "evaluate.py")
    required = {"grpo.py": ["--data", "d"], "sft.py": ["--data", "d"], "evaluate.py": ["--output_dir", "o"]}.get(script, [])
    stage_args([f"configs/{config}.yaml", *required], script)


@pytest.mark.slow
def test_reproduce_3b_runs_end_to_end_with_toy_arguments(tiny_model_dir, toy_data_dir, tmp_path):
    """Wiring only, not numbers: the random tiny model passes nothing, so MIN_PASS=0 keeps rows."""
    out = make(
        "reproduce-3b", f"RUNS={tmp_path}", f"QWEN_3B={tiny_model_dir}", f"M23K={toy_data_dir}",
        f"EVAL_DATA={toy_data_dir}", "EVAL_SPLIT=test", "LAUNCH=.venv/bin/python", "MIN_PASS=0",
        "PASS_ARGS=--n 2 --temperature 1.0 --max_new_tokens 4 --batch_size 16 --limit 16",
        "GRPO_ARGS=--rollout_batch_size 4 --mini_batch_size 2 --group_size 2 --max_new_tokens 4 "
        "--max_steps 1 --gradient_checkpointing False --micro_batch_size 8 --eval_every 0",
        "EVAL_ARGS=--max_new_tokens 4 --batch_size 24")
    run = tmp_path / "reproduce-3b"
    kept = datasets.load_from_disk(str(run / "filtered"))
    assert len(kept) == 16  # the 16 rows with pass counts, every one in [0, 7] with 2 samples
    assert len((run / "grpo" / "metrics.jsonl").read_text().splitlines()) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"grpo"} and summary["grpo"]["benchmarks"]["ToyLesion"]["samples"] == 8
    assert "| 3B RL(m23k) (paper) | - | - | - | 0.5319 |" in out
    # Every stage's output exists now: a second call runs nothing but the final table.
    again = make("reproduce-3b", f"RUNS={tmp_path}", f"QWEN_3B={tiny_model_dir}", f"M23K={toy_data_dir}",
                 f"EVAL_DATA={toy_data_dir}", "EVAL_SPLIT=test", "LAUNCH=false")
    assert "grpo.py" not in again and "0.5319" in again


# The MedVLSynther models (docs/recipes.md), written from the official scripts of
# github.com/UCSC-VLAA/MedVLSynther, train/<size>_biomedica_webdataset_<SCRIPT>.sh:
# train_batch_size -> --rollout_batch_size, ppo_mini_batch_size -> --mini_batch_size,
# n_gpus_per_node -> --num_processes; paper averages from the paper's Tables 2-4.
QV = "glm_generated_qwen_verified_VQA_parquet_25k_filtered_13k"
SYNTHER = [
    # target, hub data set, prompts per step, mini-batch, GPUs, paper row, official script (abridged)
    ("synther-3b-1k", "MedSynVQA-1K", 32, 16, 4, "3B RL(MedSynVQA-1K)=0.5264", f"3b {QV}_subset1k_grpo_4a100"),
    ("synther-3b-2k", "MedSynVQA-2K", 32, 16, 4, "3B RL(MedSynVQA-2K)=0.5487", f"3b {QV}_subset2k_grpo_4a100"),
    ("synther-3b-5k", "MedSynVQA-5K", 48, 24, 8, "3B RL(MedSynVQA-5K)=0.5585", f"3b {QV}_subset5k_grpo_8a100"),
    ("synther-3b-10k", "MedSynVQA-10K", 32, 16, 4, "3B RL(MedSynVQA-10K)=0.5503", f"3b {QV}_subset10k_grpo_4a100"),
    ("synther-3b-13k", "MedSynVQA-13K", 64, 32, 8, "3B RL(MedSynVQA-13K)=0.5517", f"3b {QV}_grpo_8a100"),
    ("synther-3b-5k-glm-glm", "MedSynVQA-5K-glm-glm", 32, 16, 4, "3B RL(MedSynVQA-5K-glm-glm)=0.5459",
     "3b glm_generated_glm_verified_..._subset5k_grpo_4a100"),
    ("synther-3b-5k-qwen-glm", "MedSynVQA-5K-qwen-glm", 32, 16, 4, "3B RL(MedSynVQA-5K-qwen-glm)=0.5393",
     "3b qwen_generated_glm_verified_..._subset5k_grpo_4a100"),
    ("synther-3b-5k-internvl-glm", "MedSynVQA-5K-internvl-glm", 32, 16, 4,
     "3B RL(MedSynVQA-5K-internvl-glm)=0.5520", "3b internvl_generated_glm_verified_..._subset5k_grpo_4a100"),
    ("synther-3b-5k-no-verify", "MedSynVQA-5K-no-verify", 32, 16, 4, "3B RL(MedSynVQA-5K-no-verify)=0.5472",
     "3b glm_generated_glm_verified_..._without_verifier_subset5k_grpo_4a100"),
    ("synther-3b-5k-pmc-style", "MedSynVQA-5K-PMC-style", 32, 16, 4, "3B RL(MedSynVQA-5K-PMC-style)=0.5480",
     "3b glm_generated_pmc_..._subset5k_grpo_4a100"),
    ("synther-7b-1k", "MedSynVQA-1K", 48, 24, 8, "7B RL(MedSynVQA-1K)=0.5496", f"7b {QV}_subset1k_grpo_8a100"),
    ("synther-7b-2k", "MedSynVQA-2K", 48, 24, 8, "7B RL(MedSynVQA-2K)=0.5696", f"7b {QV}_subset2k_grpo_8a100"),
    ("synther-7b-5k", "MedSynVQA-5K", 48, 24, 8, "7B RL(MedSynVQA-5K)=0.5756", f"7b {QV}_subset5k_grpo_8a100"),
    ("synther-7b-10k", "MedSynVQA-10K", 48, 24, 8, "7B RL(MedSynVQA-10K)=0.5748", f"7b {QV}_subset10k_grpo_8a100"),
    ("synther-7b-13k", "MedSynVQA-13K", 64, 32, 8, "7B RL(MedSynVQA-13K)=0.5815", f"7b {QV}_grpo_8a100"),
    # The script sets no ppo_mini_batch_size: 24 as in every other 7B script at 48 prompts per step.
    ("synther-7b-5k-glm-glm", "MedSynVQA-5K-glm-glm", 48, 24, 8, "7B RL(MedSynVQA-5K-glm-glm)=0.5808",
     "7b glm_generated_glm_verified_..._subset5k_grpo_8a100"),
    ("synther-7b-5k-qwen-glm", "MedSynVQA-5K-qwen-glm", 48, 24, 8, "7B RL(MedSynVQA-5K-qwen-glm)=0.5642",
     "7b qwen_generated_glm_verified_..._subset5k_grpo_8a100"),
    ("synther-7b-5k-internvl-glm", "MedSynVQA-5K-internvl-glm", 48, 24, 8,
     "7B RL(MedSynVQA-5K-internvl-glm)=0.5778", "7b internvl_generated_glm_verified_..._subset5k_grpo_8a100"),
    ("synther-7b-5k-no-verify", "MedSynVQA-5K-no-verify", 48, 24, 8, "7B RL(MedSynVQA-5K-no-verify)=0.5733",
     "7b glm_generated_glm_verified_..._without_verifier_subset5k_grpo_8a100"),
    ("synther-7b-5k-pmc-style", "MedSynVQA-5K-PMC-style", 48, 24, 8, "7B RL(MedSynVQA-5K-PMC-style)=0.5515",
     "7b glm_generated_pmc_..._subset5k_grpo_8a100"),
]


def grpo_run(out: str):
    """(grpo.py's arguments on its `make -n` line, settings file included; its process count)."""
    (argv,) = stage_commands(out, "grpo.py")
    processes = re.search(r"--num_processes (\d+) grpo\.py", out.replace("\\\n", " ")).group(1)
    return stage_args(argv, "grpo.py"), int(processes)


def test_every_medvlsynther_target_is_in_the_table():
    makefile = (ROOT / "Makefile").read_text()
    assert set(re.findall(r"^\$\(eval \$\(call synther,([^,]+),", makefile, re.M)) == {row[0] for row in SYNTHER}


@pytest.mark.parametrize("target,data,batch,mini,gpus,paper,script", SYNTHER, ids=[row[0] for row in SYNTHER])
def test_make_n_medvlsynther(target, data, batch, mini, gpus, paper, script):
    out = make("-n", target, "RUNS=/tmp/never-run")
    args, processes = grpo_run(out)
    assert stage_commands(out, "grpo.py")[0][0] == "configs/grpo_synther.yaml"
    size = target.split("-")[1].upper()
    assert args.model == f"Qwen/Qwen2.5-VL-{size}-Instruct"
    assert args.data == f"MedVLSynther/{data}" and args.split == "train"
    assert "curate.py" not in out and "passcounts" not in out  # MedSynVQA is curated already
    assert (args.rollout_batch_size, args.mini_batch_size) == (batch, mini), script
    assert processes == gpus, script
    # The same in every official script: rollout n 8, lr 1e-6, k3 KL loss 0.01, 4096-token responses,
    # no prompt dropped (max_prompt_length 80000), 1 epoch.
    assert (args.group_size, args.learning_rate, args.beta, args.max_new_tokens, args.max_prompt_length,
            args.num_epochs) == (8, 1e-6, 0.01, 4096, 80000, 1)
    assert args.resume == "latest"
    assert f'--paper "{paper}"' in out


def test_medvlsynther_num_gpus_override_and_alias():
    assert grpo_run(make("-n", "synther-3b-1k", "NUM_GPUS=8", "RUNS=/tmp/never-run"))[1] == 8
    out = make("-n", "reproduce-synther-3b", "RUNS=/tmp/never-run")
    assert grpo_run(out)[0].data == "MedVLSynther/MedSynVQA-5K"
    assert '--paper "3B RL(MedSynVQA-5K)=0.5585"' in out


def test_every_stage_line_of_the_demo_parses(tmp_path):
    """The demo's command lines (its own section of the Makefile) against the stages' arguments."""
    out = make("-n", "demo", f"DEMO={tmp_path / 'demo'}")
    for script in ("evaluate.py", "sft.py", "curate.py", "grpo.py"):
        for argv in stage_commands(out, script):
            stage_args(argv, script)


def test_make_n_reproduce_3b_engine_vllm_passes_the_engine_to_every_generation():
    """ENGINE=vllm: every evaluate.py and grpo.py line gets --engine vllm and runs under accelerate
    launch with the recipe's process count, one engine beside each process; the default lines carry
    no --engine at all."""
    out = make("-n", "reproduce-3b", "ENGINE=vllm", "RUNS=/tmp/never-run")
    for script in ("evaluate.py", "grpo.py"):
        assert all(argv for argv in stage_commands(out, script))
    assert out.count("accelerate launch --config_file configs/fsdp.yaml --num_processes 8") == 3
    generating = stage_commands(out, "evaluate.py") + stage_commands(out, "grpo.py")
    assert len(generating) == 3  # pass counts, GRPO, evaluation
    assert [stage_args(argv, s).engine for argv, s in zip(generating, ["evaluate.py"] * 2 + ["grpo.py"])] == [
        "vllm"] * 3
    assert "--num_processes 8 grpo.py configs/grpo_m23k.yaml" in out
    (sft_argv,) = stage_commands(make("-n", "reproduce-3b-sft", "ENGINE=vllm", "RUNS=/tmp/never-run"), "sft.py")
    assert "--engine" not in sft_argv  # sft.py generates nothing
    assert "--engine" not in make("-n", "reproduce-3b", "RUNS=/tmp/never-run")


# ---------------------------------------------------------------------------------------------
# MedVLSynther's data: synth.py's targets (docs/recipes.md, "Re-making the data")
# ---------------------------------------------------------------------------------------------

# target: (generator, its model, verifier, its model, select's --subset, --verified, output folder)
SYNTH_TARGETS = {
    "synth-data-glm-glm": ("glm", "zai-org/GLM-4.5V", "glm", "zai-org/GLM-4.5V", 5000, True, "MedSynVQA-5K-glm-glm"),
    "synth-data-qwen-glm": ("qwen", "Qwen/Qwen2.5-VL-72B-Instruct", "glm", "zai-org/GLM-4.5V", 5000, True,
                            "MedSynVQA-5K-qwen-glm"),
    "synth-data-internvl-glm": ("internvl", "OpenGVLab/InternVL3_5-38B-HF", "glm", "zai-org/GLM-4.5V", 5000, True,
                                "MedSynVQA-5K-internvl-glm"),
    "synth-data-no-verify": ("glm", "zai-org/GLM-4.5V", None, None, 5000, False, "MedSynVQA-5K-no-verify"),
    "synth-data-pmc-style": ("glm_pmc", "zai-org/GLM-4.5V", None, None, 5000, False, "MedSynVQA-5K-PMC-style"),
}


def synth_steps(out: str) -> dict:
    """{step: [synth.Args of each line]} of a `make -n` output."""
    found = {}
    for argv in stage_commands(out.replace(" && ", "\n"), "synth.py"):  # the subsets: one line, joined by &&
        found.setdefault(argv[0], []).append(runtime.parse_args(synth.Args, argv=argv[1:]))
    return found


@pytest.mark.parametrize("target", sorted(SYNTH_TARGETS))
def test_make_n_synth_data_ablations(target):
    generator, gen_model, verifier, ver_model, subset, verified, folder = SYNTH_TARGETS[target]
    steps = synth_steps(make("-n", target, "FIGURES=/tmp/figures", "SYNTH=/tmp/never-run"))
    (gen,) = steps["generate"]
    assert (gen.generator, gen.model, gen.engine, gen.max_new_tokens, gen.temperature) == \
        (generator, gen_model, "vllm", 4096, 0.0)
    assert gen.tensor_parallel == (4 if gen_model == "zai-org/GLM-4.5V" else 8)
    if verifier:
        (ver,) = steps["verify"]
        assert (ver.verifier, ver.model, ver.max_new_tokens, ver.figures) == (verifier, ver_model, 2048, "/tmp/figures")
        assert ver.data == f"/tmp/never-run/generated-{generator}/generated.jsonl"
    else:
        assert "verify" not in steps
    (sel,) = steps["select"]
    assert (sel.subset, sel.verified, sel.min_score, sel.require_pass, sel.rebalance, sel.seed) == \
        (subset, verified, 0.9670, True, True, 42)
    assert sel.output_dir == f"/tmp/never-run/{folder}"


def test_make_n_synth_data_makes_the_13k_and_its_subsets():
    steps = synth_steps(make("-n", "synth-data", "FIGURES=/tmp/figures", "SYNTH=/tmp/never-run"))
    assert [(a.generator, a.model) for a in steps["generate"]] == [("glm", "zai-org/GLM-4.5V")]
    assert [(a.verifier, a.model, a.max_new_tokens, a.tensor_parallel) for a in steps["verify"]] == \
        [("qwen", "Qwen/Qwen2.5-VL-72B-Instruct", 4096, 8)]
    assert [(a.subset, a.output_dir) for a in steps["select"]] == \
        [(None, "/tmp/never-run/MedSynVQA-13K")] + [(n * 1000, f"/tmp/never-run/MedSynVQA-{n}K") for n in (1, 2, 5, 10)]


@pytest.mark.slow
def test_make_synth_demo_runs_end_to_end(tmp_path):
    out = make("synth-demo", f"SYNTH_DEMO={tmp_path}", timeout=600)
    assert "dropped 24: the generator's answer holds no JSON object" in out
    assert json.loads((tmp_path / "MedSynVQA-13K" / "select.json").read_text())["lines"] == 24
