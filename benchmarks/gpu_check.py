"""One GPU, a few minutes: what the real path costs, measured through the stage scripts (issue 12, part 5).

    bash benchmarks/gpu_check.sh          # one NVIDIA GPU: Qwen2.5-VL-3B sizes, random weights, bf16
    bash benchmarks/gpu_check.sh --cpu    # the same code on the tiny real-tokenizer model (CI runs it)

It saves a randomly initialised model with the real Qwen2.5-VL processor (toy.py's, `--tokenizer
qwen`): on a GPU the exact 3B configuration of benchmarks/plan.py, on `--cpu` toy.py's tiny one.
Its generation_config gives the two end-of-turn ids a bias of -inf (`sequence_bias`, which the
stage scripts do not set, so generate takes it from the checkpoint), and every sample runs to the
token limit. (`bad_words_ids` would not do: transformers drops end-of-sequence ids from it.) Then, each stage in its own process,
called with its command-line arguments (`main(argv)`), nothing else of it used:
1. evaluate.py: 64 prompts x 8 samples x 1024 new tokens in one generate call -> tokens/s;
2. grpo.py: one step (8 prompts x 8 samples x 512 tokens) -> its time split (generate, score,
   log-probs, update, from its metrics.jsonl) and the MFU of generate, log-probs and update, with
   benchmarks/plan.py's FLOP formulas;
3. sft.py: two steps of one 4096-token sequence -> the second step's time and MFU;
4. evaluate.py greedy, as the paper's evaluation: 64 prompts x 256 new tokens -> rows/s;
5. evaluate.py --engine vllm, as check 1, when vLLM is installed -> tokens/s and the ratio to HF;
6. TRL's GRPOTrainer, one step at check 2's settings, when TRL is installed (the wheelhouse has it;
   benchmarks/grpo_vs_trl.py's driver) -> its time and the ratio to grpo.py's step;
and the peak memory of each process (torch's peak allocation on a GPU, peak RSS on a CPU).
grpo.py and sft.py run with --save_steps 0 --save_final False: no checkpoint and no final/ (7.5 GB
of bf16 weights each for the 3B), and with --mixed_precision bf16 on a GPU (their `auto` there).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

# (GPU, --cpu) sizes of each check; a flag left unset takes the one of its mode.
SIZES = dict(
    prompts=(64, 4), samples=(8, 2), new_tokens=(1024, 8),
    grpo_prompts=(8, 2), grpo_group=(8, 2), grpo_new_tokens=(512, 8), grpo_micro_batch=(8, 4),
    sft_tokens=(4096, 256), peak_tflops=(989.0, 0.1), eval_new_tokens=(256, 8),
)
END_OF_TURN_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>

# Runs one stage in a fresh process: `python -c RUNNER stage arg...`. It calls the stage's
# main(argv), as its command line would, and prints its peak memory as one JSON line.
# checkpoints_skipped: the stage was told to write none (--save_steps 0 --save_final False).
RUNNER = r"""
import json, resource, sys, time
stage, argv = sys.argv[1], sys.argv[2:]
name, _, entry = stage.partition(":")  # grpo_vs_trl:trl_driver, or a stage's main
module = __import__(name)
started = time.perf_counter()
getattr(module, entry or "main")(argv)
no_save = "--save_final" in argv and argv[argv.index("--save_final") + 1] == "False"
report = dict(seconds=time.perf_counter() - started, checkpoints_skipped=no_save,
              peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
import torch
if torch.cuda.is_available():
    report["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
print("GPU_CHECK_STAGE " + json.dumps(report), flush=True)
"""


@dataclass
class CheckArgs:
    cpu: bool = field(default=False, metadata={"help": "The tiny model and a few tokens, on the CPU (CI)."})
    workdir: str | None = field(default=None, metadata={"help": "Folder for model, data, runs (default: temporary)."})
    keep: bool = field(default=False, metadata={"help": "Keep --workdir's contents."})
    prompts: int | None = field(default=None, metadata={"help": "evaluate.py: prompts (GPU 64)."})
    samples: int | None = field(default=None, metadata={"help": "evaluate.py: samples per prompt (GPU 8)."})
    new_tokens: int | None = field(default=None, metadata={"help": "evaluate.py: new tokens (GPU 1024)."})
    grpo_prompts: int | None = field(default=None, metadata={"help": "grpo.py: prompts per step (GPU 8)."})
    grpo_group: int | None = field(default=None, metadata={"help": "grpo.py: samples per prompt (GPU 8)."})
    grpo_new_tokens: int | None = field(default=None, metadata={"help": "grpo.py: new tokens (GPU 512)."})
    grpo_micro_batch: int | None = field(default=None, metadata={"help": "grpo.py: sequences per forward (GPU 8)."})
    sft_tokens: int | None = field(default=None, metadata={"help": "sft.py: tokens of the sequence (GPU 4096)."})
    eval_new_tokens: int | None = field(default=None, metadata={"help": "evaluate.py greedy: new tokens (GPU 256)."})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "Peak dense bf16 TFLOP/s for MFU (GPU: 989, H100/H200 SXM; --cpu: a nominal 0.1)."})


def fill_sizes(args: CheckArgs) -> CheckArgs:
    for name, (gpu, cpu) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu if args.cpu else gpu)
    return args


def save_model(args: CheckArgs, folder: str) -> dict:
    """A random model with the real processor; every sample will run to the token limit.

    GPU: the exact Qwen2.5-VL-3B configuration, initialised on the GPU in bf16 (seconds; 7.5 GB on
    disk). --cpu: `toy.py model --tokenizer qwen` (tiny sizes).
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    import plan
    import toy

    if args.cpu:
        model, processor = toy.build_model(toy.ModelArgs(output_dir=folder, size="tiny", tokenizer="qwen"))
    else:
        processor = toy.build_processor("qwen")
        config = plan.build_config("3B")
        config.text_config.pad_token_id = 151643
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    # generate() takes what a call leaves unset from here, and no stage sets sequence_bias.
    model.generation_config = GenerationConfig(
        **toy.QWEN_GENERATION, sequence_bias=[[[i], float("-inf")] for i in END_OF_TURN_IDS])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return dict(config=model.config, parameters=sum(p.numel() for p in model.parameters()))


def sized_row(processor, row: dict, n_tokens: int) -> tuple[dict, int]:
    """The row with its reasoning trace repeated until prompt + target + <|im_end|> is n_tokens long
    (or a token short: a word can be two tokens). Returns the row and its length."""
    import reward

    def length(words: list[str]) -> int:
        r = dict(row, reasoning=" ".join(words))
        prompt = processor.apply_chat_template(reward.build_messages(r), add_generation_prompt=True,
                                               tokenize=False)
        full = prompt + reward.sft_target(r["reasoning"], r["answer_label"]) + "<|im_end|>"
        return len(processor.tokenizer(full)["input_ids"])

    unit = row["reasoning"].split()
    words = list(unit)
    while length(words) < n_tokens:
        words += unit
    low, high = len(unit), len(words)  # the longest prefix of words that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if length(words[:mid]) <= n_tokens else (low, mid - 1)
    words = words[:low]
    while length(words + ["ok"]) <= n_tokens:
        words.append("ok")
    return dict(row, reasoning=" ".join(words)), length(words)


def save_data(args: CheckArgs, folder: str, processor) -> dict:
    """Toy questions for evaluate.py (test) and grpo.py (train), and two long sequences for sft.py."""
    import datasets

    import reward
    import toy

    data = toy.build_data(toy.DataArgs(output_dir=folder, n_sft=3, n_train=max(args.grpo_prompts, 3),
                                       n_validation=3, n_test=args.prompts))
    long_rows, lengths = [], []
    for i in (0, 1):  # the first two families are text questions
        row, n = sized_row(processor, data["sft"][i], args.sft_tokens)
        long_rows.append(row)
        lengths.append(n)
    data["sft"] = datasets.Dataset.from_list(long_rows, features=data["sft"].features)
    data.save_to_disk(folder)
    texts, _ = reward.chat_prompts(processor, list(data["train"]))
    prompt_tokens = [len(processor.tokenizer(t)["input_ids"]) for t in texts]
    images = sum(len(r["images"] or []) for r in data["train"])
    return dict(sft_tokens=min(lengths), grpo_prompt_tokens=sum(prompt_tokens) / len(prompt_tokens)
                + 3 * images / len(prompt_tokens))  # an image: 1 pad in the text, 4 after expansion


def run_stage(stage: str, argv: list[str], env: dict) -> tuple[dict, str]:
    """One stage in its own process; returns its peak-memory report and its output."""
    command = [sys.executable, "-c", RUNNER, stage, *argv]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{stage}.py failed (exit {result.returncode}):\n{output[-4000:]}")
    found = re.findall(r"^GPU_CHECK_STAGE (.*)$", result.stdout, re.MULTILINE)
    return json.loads(found[-1]), output


def last_metrics(path: Path, keys: list[str]) -> dict:
    """The last line of a metrics.jsonl; a missing key is named rather than guessed."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    missing = [k for k in keys if k not in lines[-1]]
    if missing:
        raise SystemExit(f"{path}: no {missing} in the last line ({sorted(lines[-1])})")
    return lines[-1]


def peak(report: dict) -> str:
    if "peak_cuda_gib" in report:
        return f"{report['peak_cuda_gib']:.1f} GiB (GPU, torch peak)"
    return f"{report['peak_rss_gib']:.2f} GiB (RSS)"


def grpo_fits(parameters: int) -> str | None:
    """Why the GRPO step cannot fit this GPU, or None. Before any loading: fp32 weights, gradients
    and Adam moments (16 bytes a parameter), the bf16 reference (2) and autocast's bf16 copies (2)
    under DDP, on one GPU, plus 4 GiB for activations and chunked logits (docs/real_path.md
    section 3)."""
    import torch

    need = 20 * parameters / 2**30 + 4
    total = torch.cuda.mem_get_info()[1] / 2**30
    if need > total:
        return (f"needs about {need:.0f} GiB (20 bytes x {parameters / 1e9:.2f}B parameters + 4 GiB), "
                f"this GPU has {total:.0f} GiB")
    return None


def check(args: CheckArgs, work: Path) -> dict:
    import importlib.util

    import plan

    # The project first, then whatever the caller put there (gpu_check.sh --wheelhouse: its packages).
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    # As the recipes: bf16 on a GPU; the --cpu check stays fp32. No checkpoints, no final/.
    train_flags = ["--mixed_precision", "no" if args.cpu else "bf16", "--save_steps", "0", "--save_final", "False"]
    model_dir, data_dir = str(work / "model"), str(work / "data")
    clock = time.perf_counter()
    made = save_model(args, model_dir)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    lengths = save_data(args, data_dir, processor)
    print(f"model ({made['parameters'] / 1e9:.2f}B parameters, random) and data saved in "
          f"{time.perf_counter() - clock:.0f} s", flush=True)
    params = plan.count_parameters(made["config"])
    peak_flops = args.peak_tflops * 1e12
    rows = {}

    # 1. Generation through evaluate.py: one call of prompts x samples sequences.
    report, out = run_stage("evaluate", [
        "--model", model_dir, "--data", data_dir, "--split", "test", "--output_dir", str(work / "eval"),
        "--n", str(args.samples), "--temperature", "1.0", "--max_new_tokens", str(args.new_tokens),
        "--batch_size", str(args.prompts), "--dtype", "float32" if args.cpu else "bfloat16"], env)
    timed = re.search(r"rows in ([0-9.]+) s", out)  # evaluate.py's own clock around generation
    seconds = float(timed.group(1)) if timed else report["seconds"]
    tokens = args.prompts * args.samples * args.new_tokens
    rows["generation"] = dict(
        what=f"evaluate.py: {args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, "
             f"one generate call, {'fp32' if args.cpu else 'bf16'}",
        figure=f"{tokens / seconds:,.0f} tokens/s ({seconds:.1f} s{'' if timed else ', whole process'})",
        tokens_per_s=tokens / seconds, peak=peak(report), report=report)

    # 2. One GRPO step, on-policy (mini-batch = rollout), so one log-prob pass (the reference).
    too_big = None if args.cpu else grpo_fits(made["parameters"])
    if too_big:
        print(f"grpo: skipped, it does not fit: {too_big}", flush=True)
        rows["grpo"] = dict(what="grpo.py, one step", figure=f"skipped: {too_big}", peak="-", report={})
    report, out = (None, None) if too_big else run_stage("grpo", [
        "--model", model_dir, "--data", data_dir, "--split", "train", "--output_dir", str(work / "grpo"),
        "--rollout_batch_size", str(args.grpo_prompts), "--group_size", str(args.grpo_group),
        "--mini_batch_size", str(args.grpo_prompts), "--generation_batch_size", str(args.grpo_prompts),
        "--micro_batch_size", str(args.grpo_micro_batch), "--max_new_tokens", str(args.grpo_new_tokens),
        "--max_steps", "1", "--learning_rate", "1e-6", *train_flags], env)
    if not too_big:
        rows["grpo"] = grpo_row(args, work, made, params, lengths, peak_flops, report)
    rows["grpo_trl"] = trl_row(args, work, model_dir, data_dir, env, too_big, rows["grpo"])

    # 3. SFT: two steps of one long sequence; the second is timed (the first pays for warm-up).
    report, out = run_stage("sft", [
        "--model", model_dir, "--data", data_dir, "--split", "sft", "--output_dir", str(work / "sft"),
        "--global_batch_size", "1", "--micro_batch_size", "1", "--max_steps", "2",
        "--gradient_checkpointing", "True", "--learning_rate", "1e-5", *train_flags], env)
    m = last_metrics(work / "sft" / "metrics.jsonl", ["tokens_per_s"])
    n = lengths["sft_tokens"]
    seconds = n / m["tokens_per_s"]
    text = made["config"].text_config
    width = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    sft_flops = 6.0 * (params["layers"] + params["head"]) * n + 3 * plan.attention_flops(
        text.num_hidden_layers, width, 0, n)
    rows["sft"] = dict(
        what=f"sft.py, one step of one {n}-token sequence, gradient checkpointing",
        figure=f"{seconds:.2f} s ({m['tokens_per_s']:,.0f} tokens/s, MFU {100 * sft_flops / (seconds * peak_flops):.1f}%)",
        seconds=seconds, mfu=sft_flops / (seconds * peak_flops), peak=peak(report), report=report)

    # 4. The paper's evaluation, greedy: rows per second through evaluate.py.
    report, out = run_stage("evaluate", [
        "--model", model_dir, "--data", data_dir, "--split", "test", "--output_dir", str(work / "greedy"),
        "--max_new_tokens", str(args.eval_new_tokens), "--batch_size", str(args.prompts),
        "--limit", str(args.prompts), "--dtype", "float32" if args.cpu else "bfloat16"], env)
    timed = re.search(r"(\d+) rows in ([0-9.]+) s", out)
    n_rows, seconds = (int(timed.group(1)), float(timed.group(2))) if timed else (args.prompts, report["seconds"])
    rows["evaluation"] = dict(
        what=f"evaluate.py greedy: {n_rows} rows x {args.eval_new_tokens} new tokens, one batch",
        figure=f"{n_rows / seconds:,.2f} rows/s ({seconds:.1f} s)", rows_per_s=n_rows / seconds,
        peak=peak(report), report=report)

    # 5. Check 1 through vLLM, when it is installed (on a CPU its attention needs head size >= 32).
    head_dim = text.hidden_size // text.num_attention_heads
    if importlib.util.find_spec("vllm") is None or (args.cpu and head_dim < 32):
        why = "vLLM not installed" if importlib.util.find_spec("vllm") is None else \
            f"head size {head_dim}: vLLM's CPU attention needs 32 or more"
        rows["generation_vllm"] = dict(what="evaluate.py --engine vllm, as generation", figure=f"skipped: {why}",
                                       peak="-", report={})
    else:
        report, out = run_stage("evaluate", [
            "--engine", "vllm", "--model", model_dir, "--data", data_dir, "--split", "test",
            "--output_dir", str(work / "vllm"), "--n", str(args.samples), "--temperature", "1.0",
            "--max_new_tokens", str(args.new_tokens), "--batch_size", str(args.prompts),
            "--dtype", "float32" if args.cpu else "bfloat16"], env)
        timed = re.search(r"rows in ([0-9.]+) s", out)
        seconds = float(timed.group(1)) if timed else report["seconds"]
        tokens = args.prompts * args.samples * args.new_tokens
        rows["generation_vllm"] = dict(
            what="evaluate.py --engine vllm: as generation", tokens_per_s=tokens / seconds,
            figure=f"{tokens / seconds:,.0f} tokens/s ({seconds:.1f} s), "
                   f"{tokens / seconds / rows['generation']['tokens_per_s']:.2f}x HF",
            peak=peak(report), report=report)
    return rows


def trl_row(args: CheckArgs, work: Path, model_dir: str, data_dir: str, env: dict, too_big: str | None,
            grpo: dict) -> dict:
    """TRL's GRPOTrainer for one step at check 2's settings (benchmarks/grpo_vs_trl.py's driver: the
    same prompts, reward, sampling, beta 0.01 with a reference model, token-mean loss, one optimizer
    step of micro-batches of the same size, gradient checkpointing as grpo.py's default, bf16 on a
    GPU), and its time
    over grpo.py's. Both are a first step: warm-up included in both."""
    import importlib.util

    what = "TRL GRPOTrainer, one step at grpo's settings"
    if importlib.util.find_spec("trl") is None:
        return dict(what=what, figure="skipped: TRL not installed (requirements-trl.txt; the wheelhouse has it)",
                    peak="-", report={})
    if too_big:
        return dict(what=what, figure=f"skipped: {too_big}", peak="-", report={})
    report, _ = run_stage("grpo_vs_trl:trl_driver", [
        "--model", model_dir, "--data", data_dir, "--output_dir", str(work / "trl"),
        "--rollout_batch_size", str(args.grpo_prompts), "--group_size", str(args.grpo_group),
        "--micro_batch_size", str(args.grpo_micro_batch), "--max_new_tokens", str(args.grpo_new_tokens),
        "--beta", "0.01", "--steps", "1", "--threads", os.environ.get("OMP_NUM_THREADS", "1"),
        "--cpu", str(args.cpu), "--bf16", str(not args.cpu), "--gradient_checkpointing", "True"], env)
    (step,) = [json.loads(line) for line in (work / "trl" / "steps.jsonl").read_text().splitlines() if line.strip()]
    ratio = step["time"] / grpo["seconds"]
    return dict(what=f"{what}: {args.grpo_prompts} prompts x {args.grpo_group} samples x {args.grpo_new_tokens} tokens",
                figure=f"{step['time']:.1f} s (generate {step['time_generate']:.1f} s): {ratio:.2f}x grpo.py's step",
                seconds=step["time"], ratio_to_grpo=ratio, peak=peak(report), report=report)


def grpo_row(args: CheckArgs, work: Path, made: dict, params: dict, lengths: dict, peak_flops: float,
             report: dict) -> dict:
    import plan

    m = last_metrics(work / "grpo" / "metrics.jsonl",
                     ["time_generate", "time_score", "time_logprob", "time_update", "completion_length"])
    shape = plan.PlanArgs(prompts=args.grpo_prompts, group_size=args.grpo_group, mini_batch=args.grpo_prompts,
                          mean_prompt_tokens=round(lengths["grpo_prompt_tokens"]),
                          mean_new_tokens=round(m["completion_length"]))
    f = plan.step_flops(made["config"], params, shape)
    mfu = {k: f[k] / (m[f"time_{k}"] * peak_flops) for k in ("generate", "logprob", "update")}
    total = m["time_generate"] + m["time_score"] + m["time_logprob"] + m["time_update"]
    return dict(
        what=f"grpo.py, one step: {args.grpo_prompts} prompts x {args.grpo_group} samples x "
             f"{args.grpo_new_tokens} tokens, micro-batch {args.grpo_micro_batch}",
        figure=f"{total:.1f} s: generate {m['time_generate']:.1f} s (MFU {100 * mfu['generate']:.1f}%), "
               f"score {m['time_score']:.1f} s, log-probs {m['time_logprob']:.1f} s (MFU {100 * mfu['logprob']:.1f}%), "
               f"update {m['time_update']:.1f} s (MFU {100 * mfu['update']:.1f}%)",
        seconds=total, mfu=mfu, completion_length=m["completion_length"], peak=peak(report), report=report)


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(CheckArgs).parse_args_into_dataclasses(argv)
    args = fill_sizes(args)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu for the small version")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    device = "CPU" if args.cpu else torch.cuda.get_device_name()
    started = time.perf_counter()
    try:
        rows = check(args, work)
    finally:
        if not args.keep:
            for name in ("model", "data", "eval", "grpo", "trl", "sft", "greedy", "vllm"):
                shutil.rmtree(work / name, ignore_errors=True)
    print(f"\n## gpu_check on {device} ({'tiny model, --cpu' if args.cpu else 'Qwen2.5-VL-3B sizes, random weights'}; "
          f"MFU against {args.peak_tflops:g} TFLOP/s)\n")
    print("| check | what | result | peak memory |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['what']} | {row['figure']} | {row['peak']} |")
    summary = {name: {k: v for k, v in row.items() if k != "report"} | {"report": row["report"]}
               for name, row in rows.items()}
    (work / "gpu_check.json").write_text(json.dumps(dict(device=device, args=vars(args), checks=summary), indent=1))
    print(f"\n{work / 'gpu_check.json'}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
