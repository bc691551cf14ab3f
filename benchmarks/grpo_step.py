"""Benchmark (not a test): one GRPO step of grpo.py on the toy models, on CPU.

    python benchmarks/grpo_step.py                      # tiny and small, B=16, G=8, 64 new tokens
    python benchmarks/grpo_step.py --sizes small --threads 1

For each toy size it builds the model (random weights: no completion ends early, so every sample
runs to max_new_tokens, the worst case) and a toy data set, runs `grpo.py` for a few steps in a
fresh process (so peak memory is that run's own), and prints the mean over the steps after the
first (which pays one-off costs) of the time per step (its four phases) and its split (generation /
scoring / log-prob passes / update), generated tokens per second of generation (grpo.py's
`generate_tokens_per_s`), peak memory and MFU (the share of the matmul peak, grpo.py's `mfu`), from
the run's metrics.jsonl.
The update settings keep the paper's ratios: mini-batch = B / 2 (two optimizer steps per rollout,
so the logp_old pass runs) and a reference model (beta 0.01).
"""

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import HfArgumentParser

from grpo_vs_trl import run  # a fresh process with a thread count and wait policy

TIMEOUT = 1800  # seconds per command


@dataclass
class BenchArgs:
    sizes: str = "tiny,small"
    rollout_batch_size: int = 16
    group_size: int = 8
    max_new_tokens: int = 64
    micro_batch_size: int = 32
    steps: int = 3
    threads: int = 2
    # Empty: OpenMP's default (what a user gets); PASSIVE (the demo's) costs small models a thread
    # wake-up per parallel op (benchmarks/GRPO_VS_TRL.md measures both).
    omp_wait_policy: str = ""
    share_prompt: bool = True  # grpo.py's default; False: the plain path, every sample's prompt computed
    work_dir: str = "/tmp/grpo_bench"


def main():
    (args,) = HfArgumentParser(BenchArgs).parse_args_into_dataclasses()
    work = Path(args.work_dir)
    data = work / "data"
    if not data.exists():
        run([sys.executable, "toy.py", "data", "--output_dir", str(data), "--n_sft", "48", "--n_train", "480",
             "--n_validation", "48", "--n_test", "48"], args.threads, TIMEOUT)
    rows = []
    for size in args.sizes.split(","):
        model = work / f"model_{size}"
        if not model.exists():
            run([sys.executable, "toy.py", "model", "--output_dir", str(model), "--size", size], args.threads,
                TIMEOUT)
        out = work / f"run_{size}"
        shutil.rmtree(out, ignore_errors=True)  # grpo.py refuses to write into a finished run's folder
        started = time.perf_counter()
        run([sys.executable, "grpo.py", "--model", str(model), "--data", str(data), "--output_dir", str(out),
             "--rollout_batch_size", str(args.rollout_batch_size), "--group_size", str(args.group_size),
             "--mini_batch_size", str(args.rollout_batch_size // 2), "--micro_batch_size",
             str(args.micro_batch_size), "--generation_batch_size", str(args.rollout_batch_size),
             "--max_new_tokens", str(args.max_new_tokens), "--max_steps", str(args.steps),
             "--save_steps", "0", "--gradient_checkpointing", "False",
             "--share_prompt", str(args.share_prompt)], args.threads, TIMEOUT, args.omp_wait_policy)
        wall = time.perf_counter() - started
        with open(out / "metrics.jsonl") as f:
            steps = [json.loads(line) for line in f][1:]  # the first step pays one-off costs

        def mean(key):
            return sum(s[key] for s in steps) / len(steps)

        step_time = sum(mean(f"time_{phase}") for phase in ("generate", "score", "logprob", "update"))
        cells = [size, f"{step_time:.2f}", f"{mean('time_generate'):.2f}", f"{mean('time_score'):.2f}",
                 f"{mean('time_logprob'):.2f}", f"{mean('time_update'):.2f}", f"{mean('generate_tokens_per_s'):.0f}",
                 f"{mean('peak_memory_gb'):.2f}",
                 f"{100 * mean('mfu'):.0f}%", f"{wall:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    print(f"B={args.rollout_batch_size} prompts x G={args.group_size}, {args.max_new_tokens} new tokens, "
          f"{args.threads} CPU thread(s), mini-batch B/2, micro-batch {args.micro_batch_size}, "
          f"OMP_WAIT_POLICY={args.omp_wait_policy or '(default)'}, --share_prompt {args.share_prompt}")
    print("| model | s/step | generate | score | logprob passes | update | generated tokens/s | peak RSS GB | MFU "
          "| run wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
