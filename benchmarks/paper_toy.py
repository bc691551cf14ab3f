"""The paper's main table in miniature: every row with a toy counterpart, trained on the toy world.

    .venv/bin/python benchmarks/paper_toy.py --output_dir runs/paper-toy        # make paper-toy
    .venv/bin/python benchmarks/paper_toy.py --output_dir runs/paper-toy-val --eval_split validation
    .venv/bin/python benchmarks/paper_toy.py --output_dir runs/paper-toy --table_only

MedVLThinker (arXiv 2508.02669) starts from Qwen2.5-VL-Instruct and trains it four ways: SFT on a
teacher's reasoning traces, kept where the teacher was right (first correct of 3); GRPO on the
questions of moderate difficulty (pass count 1..7 of 16), from text-only m23k or from image-text
PMC-VQA. Its abstract states two findings: RLVR outperforms SFT, and text-only data helps RLVR more
than image-text data. The toy counterpart of each row, per seed (toy model, data and training seeds
all equal the seed, as `make demo SEED=s`):

| row | toy counterpart | paper row (Avg of six) |
|---|---|---|
| base | the random `small` model | none (the paper starts from Instruct) |
| instruct | SFT of the random model on the whole `sft` split: the demo's warm start, which quotes the teacher's wrong reference range three times in four | Qwen2.5-VL-3B-Instruct 0.4914 |
| sft-text | instruct + SFT on the text traces of the `sft` split whose conclusion is the gold letter (the toy teacher gives one sample a question, so "first correct of 1") | none in this repo |
| sft-image | the same on the image traces | 3B SFT(PMC) 0.5016 |
| rl-text | instruct + GRPO on the text questions of `train` that the instruct model answers right 1..7 times of 16 | 3B RL(m23k) 0.5319 |
| rl-image | the same on every image question of `train` (the filter keeps none) | 3B RL(PMC) 0.5228 |
| sft-text+rl-text | sft-text, then the GRPO of rl-text from it (same pool, same settings) | none in this repo |

The two modalities are scored and filtered apart, as the paper filtered m23k and PMC-VQA apart:
`--text_pass_rows` and `--image_pass_rows` questions from the start of each (the text families
alternate, so the text pool holds both vital signs). The filter keeps no image question (the
instruct model answers nearly every lesion right 16 times of 16), so rl-image trains on every image
question of `train` (`--unfiltered image`). Every model is scored greedily on `--eval_split` (`test`: the held-out
toy benchmarks; `validation`: for choosing settings, which is the only split settings were chosen
on). The table gives, per row, each benchmark and the Avg as the mean and sample standard deviation
over the seeds, each seed's Avg, and the paper's Avg beside it; the comparisons the paper's findings
make are printed per seed below it. summary.json and summary.md hold both.

Every command is a stage script's own (toy.py, sft.py, evaluate.py, curate.py, grpo.py), run as a
child process with `--threads` torch threads (the thread count decides fp32 bits: Makefile,
DEMO_THREADS), `--jobs` of them at once: on 2 cores two one-thread processes do more work than one
two-thread process (six GRPO steps of rl-text: one 2-thread run 68.8 s, two 1-thread runs side by
side 87.0 s for both, measured on a shared machine): a toy model's matmuls are too small to keep
two threads busy. Each command's output goes to its own log in the seed's folder. A stage whose output exists
is skipped, and the trainers run with `--resume latest`, so a stopped grid resumes.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402  (benchmarks_of, average_of: the readers of results.json)

# row: (the paper's row it stands for, the paper's Avg of six as a fraction, or None)
PAPER = {
    "base": (None, None),
    "instruct": ("Qwen2.5-VL-3B-Instruct", 0.4914),
    "sft-text": (None, None),
    "sft-image": ("3B SFT(PMC)", 0.5016),
    "rl-text": ("3B RL(m23k)", 0.5319),
    "rl-image": ("3B RL(PMC)", 0.5228),
    "sft-text+rl-text": (None, None),
}
ROWS = list(PAPER)
MODALITIES = ("text", "image")


@dataclass
class GridArgs:
    output_dir: str = field(default="runs/paper-toy", metadata={"help": "One folder per seed inside it."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_split: str = field(default="test", metadata={
        "help": "test (the held-out toy benchmarks) or validation (for choosing settings)."})
    jobs: int = field(default=2, metadata={"help": "Child processes at once."})
    threads: int = field(default=1, metadata={"help": "Torch threads per child process."})
    # The warm start: the demo's SFT (Makefile DEMO_SFT_ARGS).
    instruct_steps: int = 600
    instruct_learning_rate: float = 3e-3
    # SFT on the kept traces, from the warm start: 100 steps of 16 (about one epoch of the text
    # traces), each row at its best of 1e-4, 3e-4 and 1e-3 on validation (README).
    sft_steps: int = 100
    sft_text_learning_rate: float = 1e-3
    sft_image_learning_rate: float = 1e-4
    # Pass counts: questions scored (16 samples each at T 1.0) from the start of each modality's pool.
    text_pass_rows: int = 400
    image_pass_rows: int = 100
    min_pass: int = 1
    max_pass: int = 7
    unfiltered: list[str] = field(default_factory=lambda: ["image"], metadata={
        "help": "Modalities whose GRPO trains on every question of its pool instead of the filtered ones "
                "(the filter keeps no image question: the README says why)."})
    # GRPO: the demo's settings (Makefile DEMO_GRPO_ARGS) but for the steps (the best of 10, 20, ...,
    # 60 on validation: README) and the validation during training.
    grpo_steps: int = 20
    grpo_learning_rate: float = 5e-5
    labs: bool = field(default=False, metadata={
        "help": "Also run the README's labs 1-4 (rl-text with one flag changed) and score them on validation."})
    table_only: bool = field(default=False, metadata={"help": "Print the table from finished evaluations."})


# ---------------------------------------------------------------------------------------------
# 1. The jobs of one seed
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One command (argv) or one in-process step (fn) of a seed, done when `done` exists."""

    name: str
    done: Path
    deps: list[str] = field(default_factory=list)
    argv: list[str] | None = None
    fn: object = None
    log: Path | None = None


def subsets(seed_dir: Path) -> None:
    """The toy counterparts of the paper's data sets, cut from the toy data with datasets' filter:
    train-{text,image} (questions for pass counts and GRPO) and traces-{text,image} (the `sft`
    split's traces whose conclusion is the gold letter: the teacher's distillation kept where it was
    right, as curate.py traces keeps the first correct sample)."""
    import datasets

    datasets.disable_progress_bars()  # the grid's own log holds one line per job
    data = datasets.load_from_disk(str(seed_dir / "data"))
    for modality in MODALITIES:
        image = modality == "image"
        data["train"].filter(lambda r: bool(r["images"]) == image).save_to_disk(str(seed_dir / f"train-{modality}"))
        kept = data["sft"].filter(lambda r: bool(r["images"]) == image and r["teacher_label"] == r["gold_label"])
        kept.save_to_disk(str(seed_dir / f"traces-{modality}"))


def pool(args: GridArgs, modality: str) -> str:
    """The folder GRPO trains on for a modality: the filtered questions, or all of them."""
    return f"train-{modality}" if modality in args.unfiltered else f"filtered-{modality}"


# The README's labs 1-4: rl-text's command with one change each (lab 1: GRPO pushed further, four
# times the learning rate for three times the steps; lab 5 reads the grid's rows).
LABS = {
    "lab1-lr2e-4-60steps": ["--learning_rate", "2e-4", "--max_steps", "60"],
    "lab2-no-std-scaling": ["--scale_rewards", "False"],
    "lab3-no-kl": ["--beta", "0"],
    "lab4-group2": ["--group_size", "2", "--rollout_batch_size", "64", "--mini_batch_size", "32"],
}


def lab_jobs(args: GridArgs, d: Path, grpo_common: list[str]) -> list[Job]:
    """Each lab's GRPO run and, as the README's lab command does, its score on `validation`;
    rl-text and instruct are scored there too, as the labs' baselines."""
    py = sys.executable
    jobs = []
    for lab, change in LABS.items():
        jobs.append(Job(lab, d / f"{lab}/final/config.json", deps=["instruct", "filter-text"],
                        argv=[py, "grpo.py", "--model", str(d / "instruct/final"), "--data", str(d / pool(args, "text")),
                              "--output_dir", str(d / lab), *grpo_common, *change]))
    for row in ("instruct", "rl-text", *LABS):
        jobs.append(Job(f"val-{row}", d / f"val-{row}/results.json", deps=[row],
                        argv=[py, "evaluate.py", "configs/eval.yaml", "--model", str(d / row / "final"),
                              "--data", str(d / "data"), "--split", "validation", "--output_dir", str(d / f"val-{row}"),
                              "--max_new_tokens", "64", "--batch_size", "64"]))
    return jobs


def seed_jobs(args: GridArgs, seed: int) -> list[Job]:
    """Every stage of one seed, each after the ones it reads."""
    py = sys.executable
    d = Path(args.output_dir) / f"seed{seed}"
    s = str(seed)
    sft_common = ["--global_batch_size", "16", "--micro_batch_size", "16", "--save_steps", "0",
                  "--seed", s, "--resume", "latest"]
    grpo_common = ["--rollout_batch_size", "16", "--group_size", "8", "--mini_batch_size", "8",
                   "--micro_batch_size", "32", "--generation_batch_size", "16", "--max_new_tokens", "64",
                   "--learning_rate", str(args.grpo_learning_rate), "--beta", "0.01",
                   "--max_steps", str(args.grpo_steps), "--save_steps", "10", "--gradient_checkpointing", "False",
                   "--eval_every", "0", "--seed", s, "--resume", "latest"]
    jobs = [
        Job("model", d / "base/config.json",
            argv=[py, "toy.py", "model", "--output_dir", str(d / "base"), "--size", "small", "--seed", s]),
        Job("data", d / "data/dataset_dict.json", argv=[py, "toy.py", "data", "--output_dir", str(d / "data"), "--seed", s]),
        Job("subsets", d / "traces-image/state.json", deps=["data"], fn=lambda: subsets(d)),
        Job("instruct", d / "instruct/final/config.json", deps=["model", "data"],
            argv=[py, "sft.py", "--model", str(d / "base"), "--data", str(d / "data"), "--split", "sft",
                  "--output_dir", str(d / "instruct"), "--learning_rate", str(args.instruct_learning_rate),
                  "--max_steps", str(args.instruct_steps), *sft_common]),
    ]
    for m in MODALITIES:
        jobs += [
            Job(f"pass-{m}", d / f"pass-{m}/results.json", deps=["instruct", "subsets"],
                argv=[py, "evaluate.py", "configs/passcount.yaml", "--model", str(d / "instruct/final"),
                      "--data", str(d / f"train-{m}"), "--output_dir", str(d / f"pass-{m}"), "--max_new_tokens", "64",
                      "--limit", str(args.text_pass_rows if m == "text" else args.image_pass_rows), "--seed", s]),
            Job(f"filter-{m}", d / f"filtered-{m}/curate_stats.json", deps=[f"pass-{m}"],
                argv=[py, "curate.py", "filter", "--data", str(d / f"train-{m}"),
                      "--predictions", str(d / f"pass-{m}/predictions.jsonl"), "--min_pass", str(args.min_pass),
                      "--max_pass", str(args.max_pass), "--output_dir", str(d / f"filtered-{m}")]),
            Job(f"sft-{m}", d / f"sft-{m}/final/config.json", deps=["instruct", "subsets"],
                argv=[py, "sft.py", "--model", str(d / "instruct/final"), "--data", str(d / f"traces-{m}"),
                      "--output_dir", str(d / f"sft-{m}"),
                      "--learning_rate", str(args.sft_text_learning_rate if m == "text" else args.sft_image_learning_rate),
                      "--max_steps", str(args.sft_steps), *sft_common]),
            Job(f"rl-{m}", d / f"rl-{m}/final/config.json", deps=["instruct", f"filter-{m}"],
                argv=[py, "grpo.py", "--model", str(d / "instruct/final"), "--data", str(d / pool(args, m)),
                      "--output_dir", str(d / f"rl-{m}"), *grpo_common]),
        ]
    jobs.append(Job("sft-text+rl-text", d / "sft-text+rl-text/final/config.json", deps=["sft-text", "filter-text"],
                    argv=[py, "grpo.py", "--model", str(d / "sft-text/final"), "--data", str(d / pool(args, "text")),
                          "--output_dir", str(d / "sft-text+rl-text"), *grpo_common]))
    for row in ROWS:
        model = d / "base" if row == "base" else d / row / "final"
        jobs.append(Job(f"eval-{row}", d / f"eval-{row}/results.json", deps=["model" if row == "base" else row, "data"],
                        argv=[py, "evaluate.py", "configs/eval.yaml", "--model", str(model), "--data", str(d / "data"),
                              "--split", args.eval_split, "--output_dir", str(d / f"eval-{row}"),
                              "--max_new_tokens", "64", "--batch_size", "64"]))
    if args.labs:
        jobs += lab_jobs(args, d, grpo_common)
    for job in jobs:
        job.log = d / "logs" / f"{job.name}.log"
        job.name, job.deps = f"seed{seed}/{job.name}", [f"seed{seed}/{dep}" for dep in job.deps]
    return jobs


# ---------------------------------------------------------------------------------------------
# 2. Running them: `jobs` child processes at once, in list order as their inputs appear
# ---------------------------------------------------------------------------------------------


def child_env(threads: int) -> dict:
    """The environment of every child: a fixed thread count (it decides fp32 bits) and passive
    waiting, so a waiting thread does not spin on the core the other child needs."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def waiting_on(jobs: list[Job]) -> dict:
    """Per job, how many jobs wait on it, directly or not: the ready job with the most starts first,
    so that a seed's warm start (which every later stage of the seed waits on) does not wait until
    the other seeds run out of work, leaving a core idle at the end."""
    children = {job.name: [j.name for j in jobs if job.name in j.deps] for job in jobs}
    count = {}
    for job in reversed(jobs):  # every dependency comes earlier in the list, so children are counted
        below = set()
        for child in children[job.name]:
            below |= {child} | count[child]
        count[job.name] = below
    return {name: len(below) for name, below in count.items()}


def run_jobs(jobs: list[Job], n_parallel: int, env: dict) -> dict:
    """Run every job once its dependencies are done, the one most others wait on first; returns
    each job's seconds (None: skipped, its output was there). A failed command stops the grid once
    the running ones end."""
    start = time.time()
    stamp = lambda: f"[{(time.time() - start) / 60:5.1f} min]"  # noqa: E731
    done = {job.name for job in jobs if job.done.exists()}
    seconds = {name: None for name in done}
    rank = waiting_on(jobs)
    pending = sorted((job for job in jobs if job.name not in done), key=lambda job: -rank[job.name])  # stable
    running, failed = {}, None
    while pending or running:
        ready = [job for job in pending if all(dep in done for dep in job.deps)]
        while ready and len(running) < n_parallel and failed is None:
            job = ready.pop(0)
            pending.remove(job)
            if job.fn is not None:  # a few seconds of datasets work: in this process
                t0 = time.time()
                job.fn()
                done.add(job.name)
                seconds[job.name] = time.time() - t0
                print(f"{stamp()} {job.name}: done in {seconds[job.name]:.0f} s", flush=True)
                ready = [j for j in pending if all(dep in done for dep in j.deps)]
                continue
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "a") as out:  # a resumed stage appends to its log
                proc = subprocess.Popen(job.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            running[proc] = (job, time.time())
            print(f"{stamp()} {job.name}: started ({' '.join(job.argv[1:3])} ...)", flush=True)
        if failed is not None and not running:
            break
        if not running and pending:
            raise SystemExit(f"paper_toy: nothing can start: {[job.name for job in pending]}")
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            job, t0 = running.pop(proc)
            if proc.returncode != 0:
                failed = failed or f"{job.name} failed (exit {proc.returncode}); its log: {job.log}"
                print(f"{stamp()} {failed}", flush=True)
                continue
            done.add(job.name)
            seconds[job.name] = time.time() - t0
            print(f"{stamp()} {job.name}: done in {seconds[job.name]:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"paper_toy: {failed}")
    return seconds


# ---------------------------------------------------------------------------------------------
# 3. The table: mean and standard deviation over the seeds, beside the paper's Avg
# ---------------------------------------------------------------------------------------------


def collect(output_dir: Path, seeds: list[int]) -> dict:
    """row -> seed -> {"benchmarks": {name: accuracy}, "average": Avg} of every finished
    evaluation, and seed -> modality -> questions the difficulty filter kept."""
    scores, kept = {row: {} for row in ROWS}, {}
    for seed in seeds:
        d = output_dir / f"seed{seed}"
        for row in ROWS:
            path = d / f"eval-{row}" / "results.json"
            if path.exists():
                results = json.loads(path.read_text())
                benchmarks = evaluate.benchmarks_of(results, str(path))
                scores[row][seed] = {"benchmarks": {b: m["accuracy"] for b, m in benchmarks.items()},
                                     "average": evaluate.average_of(results)[0]}
        for m in MODALITIES:
            stats = d / f"filtered-{m}" / "curate_stats.json"
            if stats.exists():
                kept.setdefault(seed, {})[m] = json.loads(stats.read_text())["kept"]
    return {"scores": scores, "kept": kept}


def mean_std(values: list[float]) -> str:
    """'mean ± sample standard deviation' over the seeds (the mean alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def comparisons(scores: dict) -> list[tuple[str, str, str, str]]:
    """The paper's findings as comparisons of two rows' Avg: (finding, better row, worse row,
    the paper's own difference or '')."""
    return [
        ("RLVR beats SFT, text data", "rl-text", "sft-text", ""),
        ("RLVR beats SFT, image data", "rl-image", "sft-image", "+0.0212 (RL(PMC) - SFT(PMC))"),
        ("RLVR on text beats RLVR on images", "rl-text", "rl-image", "+0.0091 (RL(m23k) - RL(PMC))"),
        ("SFT then RL against RL alone", "sft-text+rl-text", "rl-text", ""),
    ]


def table(summary: dict, split: str) -> str:
    """The paper's layout: benchmarks as columns, Avg last, the paper's Avg beside ours; then the
    findings' differences seed by seed."""
    scores, kept = summary["scores"], summary["kept"]
    names = list(dict.fromkeys(b for row in scores.values() for s in row.values() for b in s["benchmarks"]))
    seeds = sorted({seed for row in scores.values() for seed in row})
    lines = [f"Accuracy (0-1) on the toy `{split}` split, mean ± standard deviation over seeds "
             f"{', '.join(map(str, seeds))}:", "",
             "| row | " + " | ".join(names) + " | Avg | Avg per seed | paper row | paper Avg |",
             "|---" * (len(names) + 5) + "|"]
    for row in ROWS:
        per_seed = scores[row]
        if not per_seed:
            continue
        cells = [mean_std([s["benchmarks"][b] for s in per_seed.values()]) for b in names]
        avgs = [per_seed[seed]["average"] for seed in sorted(per_seed)]
        paper_row, paper_avg = PAPER[row]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {mean_std(avgs)} | "
                     + " / ".join(f"{a:.4f}" for a in avgs)
                     + f" | {paper_row or 'none'} | {'-' if paper_avg is None else f'{paper_avg:.4f}'} |")
    if kept:
        lines += ["", "Questions kept by the difficulty filter (pass count 1..7 of 16), per seed: "
                  + "; ".join(f"seed {seed}: " + ", ".join(f"{m} {n}" for m, n in sorted(k.items()))
                              for seed, k in sorted(kept.items()))]
    lines += ["", "| finding (paper) | toy comparison | Avg difference per seed | mean | holds on |", "|---|---|---|---|---|"]
    for finding, better, worse, paper in comparisons(scores):
        common = sorted(set(scores[better]) & set(scores[worse]))
        if not common:
            continue
        diffs = [scores[better][s]["average"] - scores[worse][s]["average"] for s in common]
        lines.append(f"| {finding}{f' (paper {paper})' if paper else ''} | {better} - {worse} | "
                     + " / ".join(f"{x:+.4f}" for x in diffs)
                     + f" | {statistics.mean(diffs):+.4f} | {sum(x > 0 for x in diffs)} of {len(diffs)} seeds |")
    return "\n".join(lines)


# What each lab watches in grpo.py's metrics.jsonl: (column, key, over the steps: "mean" or "last").
LAB_METRICS = [("zero-advantage groups", "zero_advantage_groups", "mean"), ("grad norm", "grad_norm", "mean"),
               ("entropy (last step)", "entropy", "last"), ("completion tokens (last step)", "completion_length", "last"),
               ("log-prob s/step", "time_logprob", "mean")]


def lab_table(output_dir: Path, seeds: list[int]) -> str:
    """The labs on `validation`: accuracy, consistency and the training metrics each lab watches,
    mean ± standard deviation over the seeds."""
    rows = ["instruct", "rl-text", *LABS]
    header = ["ToyHeartRate", "ToyFever", "ToyLesion", "Avg", "consistency"] + [c for c, _, _ in LAB_METRICS]
    lines = ["Labs 1-4 on the toy `validation` split (rl-text's GRPO with one change), mean ± standard deviation "
             f"over seeds {', '.join(map(str, seeds))}:", "",
             "| run | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for row in rows:
        values = {column: [] for column in header}
        for seed in seeds:
            d = output_dir / f"seed{seed}"
            path = d / f"val-{row}" / "results.json"
            if not path.exists():
                continue
            results = json.loads(path.read_text())
            benchmarks = evaluate.benchmarks_of(results, str(path))
            for b in ("ToyHeartRate", "ToyFever", "ToyLesion"):
                values[b].append(benchmarks[b]["accuracy"])
            values["Avg"].append(evaluate.average_of(results)[0])
            values["consistency"].append(statistics.mean(m["consistency"] for m in benchmarks.values()))
            metrics_file = d / row / "metrics.jsonl"
            if row != "instruct" and metrics_file.exists():
                steps = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
                for column, key, how in LAB_METRICS:
                    series = [step[key] for step in steps if step.get(key) is not None]
                    values[column].append(series[-1] if how == "last" else statistics.mean(series))
        if values["Avg"]:
            lines.append(f"| {row} | " + " | ".join(mean_std(values[c]) if values[c] else "-" for c in header) + " |")
    return "\n".join(lines)


def main(argv=None):
    (args,) = HfArgumentParser(GridArgs).parse_args_into_dataclasses(argv)
    out = Path(args.output_dir)
    if not args.table_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "grid_args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
        jobs = [job for seed in args.seeds for job in seed_jobs(args, seed)]
        t0, cpu0 = time.time(), os.times()
        seconds = run_jobs(jobs, args.jobs, child_env(args.threads))
        cpu = os.times()
        wall = time.time() - t0
        child_cpu = (cpu.children_user - cpu0.children_user) + (cpu.children_system - cpu0.children_system)
        (out / "timing.json").write_text(json.dumps({"wall_s": round(wall, 1), "children_cpu_s": round(child_cpu, 1),
                                                     "jobs_s": seconds}, indent=2) + "\n")
        print(f"paper_toy: {wall / 60:.1f} min wall, {child_cpu / 60:.1f} min CPU in the stage processes")
    summary = collect(out, args.seeds)
    text = table(summary, args.eval_split)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.labs:
        text += "\n\n" + lab_table(out, args.seeds)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    main()
