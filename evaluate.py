"""Evaluation: benchmark accuracy, pass counts and teacher samples with one inference engine.

MedVLThinker (arXiv 2508.02669) reports greedy accuracy per benchmark and their unweighted mean
(Tables 2-4), filters training data by a pass count over 16 samples at T 1.0 (Section 3.2), and
distils reasoning traces from the first correct of 3 teacher samples. All three are "answer every
row K times and grade each answer", so this one script does them (docs/method.md sections 4, 7, 8):

    python evaluate.py --model M --data D --split test --output_dir DIR                  # greedy
    python evaluate.py configs/eval.yaml --model M --data D --output_dir DIR       # from a file
    python evaluate.py --model M --data D --split train --n 16 --temperature 1.0 --output_dir DIR
    python evaluate.py --engine vllm --model M --data D --output_dir DIR   # optional (docs/vllm.md)
    accelerate launch evaluate.py --model M --data D --output_dir DIR                    # rows split
    python evaluate.py --regrade DIR/predictions.jsonl --output_dir DIR2                 # no model
    python evaluate.py --compare base=DIR1 grpo=DIR2 --output_dir DIR3                   # one table

A YAML or JSON file as the first argument gives settings (configs/eval.yaml, configs/passcount.yaml);
flags after it override them. DIR receives:
- `predictions.jsonl`, one line per row, in dataset order: `dataset_name`, `dataset_index`,
  `answer_label`, `answer`, `options` (the row's, as an object), `prompt` (the chat text given to
  the processor, one <|image_pad|> per image before it expands), `responses` (the K decoded
  completions), `preds` (the answer each one gives by the evaluation rule), `correct` (0/1 each, the
  evaluation rule: the paper's tables), `pass_correct` (0/1 each, the pass-count grade of the
  official inference script: sum it for a pass count), `consistent` (see `grade`);
- `results.json`, in the shape lmms-eval and lm-evaluation-harness write: `results` (per benchmark:
  accuracy, maj@K, pass@K, each with its standard error `<metric>_stderr`, format and consistency
  rates, `n`), `config` (the run's settings), `git_hash` (this project's commit), `date`; and our own
  keys: `benchmarks` (the same as `results`), `average` (the unweighted mean of the accuracies, as
  the paper's tables) with `average_stderr`, `skipped`, `seconds`. A markdown table is printed;
- `run.json` (what this run is: a changed data set or setting is refused, the same run resumes) and,
  with `--on_bad_row skip`, `bad_rows.jsonl` (docs/method.md section 10).

What the results depend on, and what holds exactly:
- Rows are answered in fixed batches: all rows sorted by prompt length (longest first, ties in
  dataset order), cut into `batch_size` chunks. The batches depend only on the data and the
  arguments, never on the number of processes or on interruptions: a resumed run, or one split
  over several processes, feeds every row to the model in the same batch as an uninterrupted
  single-process run. Sampling is seeded per batch from `--seed` and the batch's first row.
  So on one machine type the responses are identical, token for token, to an uninterrupted
  single-process run, greedy or sampled (tests/test_evaluate.py checks it for a sampled run on
  CPU in fp32).
- A row's greedy answer does not depend on the batch it is in up to floating point: padding and
  batch shape change the order of reductions. In fp32 on CPU the toy model's greedy answers equal
  a one-row-at-a-time loop exactly (tested); in bf16 on GPU a near-tie can flip, which is why the
  paper averages three runs. Sampled answers are reproducible for a fixed --seed and
  --batch_size; across seeds or batch sizes only their statistics agree.
- `--engine vllm` (section 2b, docs/vllm.md) answers with vLLM instead of HF generate: the same
  prompts, sampling settings, files and resuming; greedy answers equal HF's on the toy in fp32,
  sampled ones come from the same distribution but are other draws (seeded per row, not per batch).
"""

import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import transformers
from accelerate import Accelerator, InitProcessGroupKwargs
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

import engine
import reward
import runtime


@dataclass
class Args:
    output_dir: str = field(metadata={"help": "Folder for predictions.jsonl, results.json, run.json."})
    model: str | None = field(default=None, metadata={"help": "Hub id or save_pretrained folder."})
    data: str | None = field(default=None, metadata={
        "help": "Hub id, save_to_disk folder, or a parquet/jsonl file in the schema of "
                "docs/method.md section 2 (image file paths relative to the file's folder)."})
    split: str = "test"
    n: int = field(default=1, metadata={
        "help": "Samples per row (K): 16 for pass counts, 3 for teacher traces."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (the paper's evaluation)."})
    top_p: float = 1.0
    max_new_tokens: int = field(default=4096, metadata={"help": "The paper's evaluation uses 4096."})
    batch_size: int = field(default=16, metadata={
        "help": "Rows per generate call; each row is repeated n times, so a call holds "
                "batch_size * n sequences."})
    limit: int | None = field(default=None, metadata={"help": "Only the first `limit` rows of the split."})
    seed: int = 0
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata={
        "help": "A row that fails the row check (docs/method.md section 10): stop and name every "
                "such row, or skip them, count them and list them in bad_rows.jsonl."})
    regrade: str | None = field(default=None, metadata={
        "help": "A predictions.jsonl to grade again (no model): ours, or the official "
                "run_offline_inference.py's (parsed_outputs). Lines need dataset_name, answer_label, "
                "answer and the responses."})
    dtype: str = field(default="auto", metadata={"help": "auto = bfloat16 on CUDA, float32 on CPU."})
    share_prompt: bool = field(default=False, metadata={
        "help": "With --n > 1 (hf engine): each row's prompt and image computed once for its n samples "
                "(engine.generate_shared, as grpo.py's rollouts), not n times. The same samples for a "
                "seed up to fp32 rounding. Pays only when completions are short next to the prompt "
                "(toy, CPU, n 16: 1.19x at 64 new tokens, 0.91x at 256); off by default (README, "
                "'Pass counts with a shared prompt')."})
    engine: Literal["hf", "vllm"] = field(default="hf", metadata={
        "help": "hf: transformers' generate (the reference). vllm: vLLM in this process, continuous "
                "batching (`make install-vllm`; docs/vllm.md); under accelerate launch one engine per process."})
    vllm_memory: float = field(default=0.9, metadata={
        "help": "--engine vllm: gpu_memory_utilization, the share of the GPU vLLM may take for weights "
                "and KV cache (on a CPU the KV cache is VLLM_CPU_KVCACHE_SPACE GiB instead)."})
    compare: list[str] = field(default_factory=list, metadata={
        "help": "NAME=DIR ... of finished evaluations (no model): one table, one row per model, "
                "written with DIR/summary.json as {NAME: {benchmarks, average}}."})
    paper: list[str] = field(default_factory=list, metadata={
        "help": "With --compare: NAME=AVG rows of the paper to print beside ours."})
    report: bool = field(default=False, metadata={
        "help": "Write --output_dir's report.html from the run folder's files (grpo.py, sft.py or "
                "evaluate.py), no model."})
    curves: list[str] = field(default_factory=list, metadata={
        "help": "With --compare: LABEL=metrics.jsonl:KEY ... one panel each in DIR/curves.png."})


# ---------------------------------------------------------------------------------------------
# 1. Rows: read, check, order into batches
# ---------------------------------------------------------------------------------------------


def stored_rows(ds):
    """Rows as stored, read as Arrow, as reward.check_rows reads them: images arrive undecoded
    ({"bytes", "path"} dicts or file paths) and only reward.open_image decodes them, so a relative
    path resolves the same way in the check and in generation (datasets' own decoder would try the
    working directory), and nothing is cached next to the data."""
    return ds.with_format("arrow")


@dataclass
class Row:
    position: int  # in the checked dataset (after --limit and skipped rows)
    key: tuple  # (dataset_name, dataset_index): what resuming and the predictions file join on
    length: int  # prompt tokens


def load_rows(args: Args, processor, show_progress: bool):
    """The split, checked once before any model work, and its rows with their prompt lengths.

    Returns (dataset, rows, bad rows, the data's fingerprint). runtime.load_split refuses an empty
    set or a missing column (a missing `answer` is named now, not after the first batch);
    reward.check_rows names every bad row (docs/method.md section 10). A set left empty by --limit
    or by skipping is an error too: a run with zero benchmarks must not look like a success.
    """
    ds = runtime.load_split(args.data, args.split)
    fingerprint = runtime.data_fingerprint(ds)  # of the whole split: --limit is a setting
    where = f"{args.data} (split {args.split})"
    if args.limit is not None:
        ds = ds.select(range(max(0, min(args.limit, len(ds)))))
        if len(ds) == 0:
            raise ValueError(f"{where}: --limit {args.limit} leaves no rows to evaluate")
    base_dir = runtime.data_dir(args.data)
    progress = partial(tqdm, desc="checking rows", unit="row", disable=not show_progress)
    good, bad = reward.check_rows(ds, args.on_bad_row, base_dir, progress=progress)
    if not good:
        raise reward.RowError(f"{where}: all {len(ds)} rows are bad, nothing to evaluate; "
                              f"the first: {bad[0]['reason']}")
    if bad:
        ds = ds.select(good)
    # A prompt longer than the model's context is skipped and counted, as grpo.py skips one over
    # --max_prompt_length (whatever --on_bad_row says): it is the model's limit, not a fault of the row.
    context = engine.context_length(args.model)
    rows, fits, batches = [], [], stored_rows(ds).iter(batch_size=64)
    stored = (row for batch in batches for row in batch.to_pylist())
    for i, row in enumerate(tqdm(stored, total=len(ds), desc="measuring prompts", unit="row",
                                 disable=not show_progress)):
        row = reward.check_row(row, base_dir)  # decoded, for the image sizes
        length = engine.prompt_length(processor, row)
        if length > context:
            bad.append({"position": i, "dataset_name": row["dataset_name"], "dataset_index": row["dataset_index"],
                        "reason": f"{reward.row_name(row)}: prompt of {length} tokens is longer than the "
                                  f"model's context ({context} positions)"})
        else:
            fits.append(i)
            rows.append(Row(len(rows), (row["dataset_name"], row["dataset_index"]), length))
    if len(fits) < len(ds):
        if not fits:
            raise ValueError(f"{where}: every prompt is longer than {args.model}'s context ({context} "
                             "positions); nothing to evaluate")
        ds = ds.select(fits)
    return ds, rows, bad, fingerprint


def make_batches(rows: list[Row], batch_size: int) -> list[list[Row]]:
    """Longest prompts first (an out-of-memory error shows at once), ties in dataset order."""
    ordered = sorted(rows, key=lambda r: (-r.length, r.position))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def batch_seed(seed: int, batch: list[Row]) -> int:
    """The sampling seed of a batch: from --seed and its first row, whoever runs it and when."""
    return reward.sampling_seed(seed, *batch[0].key)


# ---------------------------------------------------------------------------------------------
# 2. Generation
# ---------------------------------------------------------------------------------------------


def load_processor(args: Args):
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"  # generation continues every prompt at its end
    return processor


def load_model(args: Args, device):
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def generate(model, processor, rows: list[dict], n: int, gen_kwargs: dict, seed: int,
             share_prompt: bool = False) -> list[list[str]]:
    """K responses per row from HF generate (engine.sample: prompts and images repeated K times
    before the processor call, or with --share_prompt each prompt prefilled once), the sampler
    seeded per batch."""
    torch.manual_seed(seed)
    new = engine.sample(model, processor, rows, n, gen_kwargs, share_prompt)
    completions = processor.batch_decode(new, skip_special_tokens=True)
    return [completions[i * n : (i + 1) * n] for i in range(len(rows))]


# ---------------------------------------------------------------------------------------------
# 2b. Generation with vLLM (--engine vllm; optional: `make install-vllm`, docs/vllm.md)
# ---------------------------------------------------------------------------------------------


def row_seed(seed: int, row: Row) -> int:
    """vLLM's sampling seed for a row: from --seed and the row alone. vLLM draws each request from
    its own generator (its n samples from seed, seed + 1, ... seed + n - 1), so a row's samples do
    not depend on its batch, the batch size or what ran before (HF's path seeds a whole batch)."""
    return reward.sampling_seed(seed, *row.key)


def generate_vllm(llm, processor, rows: list[dict], n: int, gen_kwargs: dict, eos_ids: list[int],
                  seeds: list) -> list[list[str]]:
    """K responses per row from vLLM (engine.VLLM: the same prompt texts, images and sampling
    settings as HF's), decoded by the same processor.batch_decode(skip_special_tokens=True).
    Continuous batching and per-request generators: sampled responses are other draws from the same
    distribution (tests/test_vllm.py compares the distributions); greedy ones are HF's up to floating
    point (equal on the toy in fp32)."""
    completions = llm.generate(processor, rows, n, gen_kwargs, eos_ids, seeds)
    texts = processor.batch_decode([ids for ids, _ in completions], skip_special_tokens=True)
    return [texts[i * n : (i + 1) * n] for i in range(len(rows))]


# ---------------------------------------------------------------------------------------------
# 3. Grading (reward.py's official rules, docs/method.md section 4) and the summary
# ---------------------------------------------------------------------------------------------


def option_letter(pred: str, options: dict) -> str | None:
    """The letter an extracted answer names: the first option it grades equal to (reward.is_correct),
    as regrade_eval_results.py converts a prediction to a letter."""
    for letter, text in options.items():
        if reward.is_correct(pred, letter, text):
            return letter
    return None


def option_named_last(text: str, options: dict) -> str | None:
    """The letter of the option whose text ends last in `text` (case-insensitive).

    Ties (one option text ends another, "pneumonia" in "bacterial pneumonia") go to the longer.
    """
    text, best, best_at = text.lower(), None, None
    for letter, option in options.items():
        option = option.strip().lower()
        start = text.rfind(option) if option else -1
        if start >= 0 and (best_at is None or (start + len(option), -start) > best_at):
            best, best_at = letter, (start + len(option), -start)
    return best


def grade(line: dict) -> dict:
    """Add `preds`, `correct`, `pass_correct` and `consistent` (one per response) to a line.

    preds, correct: the evaluation rule (reward.extract_answer, reward.is_correct; section 4.2).
    pass_correct: the pass-count and trace grade (reward.pass_correct; section 4.3), which
    curate.py counts: it differs from `correct` (no fallbacks, the first answer block).
    consistent: 1 when the answer's letter is the option the reasoning (reward.think_text, the
    first think block) names last, 0 when it names another option (or the answer is no option),
    null when it names none or there are no options. GRPO's reward never reads the reasoning, so
    this shows answers drifting away from it (docs/method.md section 11).
    """
    options = reward.parse_options(line) if line.get("options") is not None else {}
    label, answer, responses = line["answer_label"], line["answer"], line["responses"]
    preds = [reward.extract_answer(response) for response in responses]
    consistent = []
    for response, pred in zip(responses, preds):
        thought = reward.think_text(response)
        named = option_named_last(thought, options) if thought is not None else None
        consistent.append(None if named is None else int(option_letter(pred, options) == named))
    return dict(line, preds=preds,
                correct=[int(reward.is_correct(p, label, answer)) for p in preds],
                pass_correct=[int(reward.pass_correct(r, label, answer)) for r in responses],
                consistent=consistent)


def majority_correct(line: dict) -> int:
    """maj@K as regrade_eval_results.py computes it: each answer becomes its option letter where it
    names one (else stays as it is), the most common wins (ties: the first seen), and it is correct
    when it is the label. A line without options (another tool's file) grades the winning answer
    with reward.is_correct instead."""
    options = reward.parse_options(line) if line.get("options") is not None else {}
    votes = [option_letter(p, options) or p for p in line["preds"]]
    vote = Counter(votes).most_common(1)[0][0]  # most_common keeps first-seen order among ties
    if options:
        return int(vote == line["answer_label"])
    return int(reward.is_correct(vote, line["answer_label"], line["answer"]))


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def stderr(values: list[float]) -> float | None:
    """The standard error of mean(values): s / sqrt(n), with s the sample standard deviation (n - 1
    in its denominator), as lm-evaluation-harness and lmms-eval compute it (their mean_stderr). For
    0/1 values with mean p it is sqrt(p (1 - p) / (n - 1)). None below two values."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def per_row_metrics(line: dict) -> dict:
    """One row's metrics, fractions 0-1: accuracy = the share of its K responses that are correct,
    maj@K / pass@K (K > 1) = 1 when its majority vote / any response is correct, format_rate = the
    share passing reward.format_ok, consistency = the mean of its non-null `consistent` (or None)."""
    k = len(line["responses"])
    metrics = {"accuracy": sum(line["correct"]) / k}
    if k > 1:
        metrics[f"maj@{k}"] = majority_correct(line)
        metrics[f"pass@{k}"] = max(line["correct"])
    metrics["format_rate"] = mean(reward.format_ok(r) for r in line["responses"])
    metrics["consistency"] = mean(c for c in line["consistent"] if c is not None)
    return metrics


def summarize(lines: list[dict]) -> dict:
    """Per benchmark (dataset_name, in order of first appearance) each metric of per_row_metrics as
    a fraction 0-1, averaged over rows, and `samples` (its rows).

    accuracy, maj@K and pass@K come with their standard error (`<metric>_stderr`) over rows: the K
    responses of a row are not independent, so the row is the unit. format_rate is the share of all
    responses; consistency the mean of all non-null `consistent` values.
    """
    ks = {len(line["responses"]) for line in lines}
    if len(ks) > 1:
        raise ValueError(f"rows have different numbers of responses {sorted(ks)}: grade them separately")
    groups: dict[str, list[dict]] = {}
    for line in lines:
        groups.setdefault(line["dataset_name"], []).append(line)
    benchmarks = {}
    for name, group in groups.items():
        rows = [per_row_metrics(line) for line in group]
        stats = {}
        for metric in [m for m in rows[0] if m not in ("format_rate", "consistency")]:
            values = [row[metric] for row in rows]
            stats.update({metric: mean(values), f"{metric}_stderr": stderr(values)})
        stats["format_rate"] = mean(reward.format_ok(r) for g in group for r in g["responses"])
        stats["consistency"] = mean(c for g in group for c in g["consistent"] if c is not None)
        stats["samples"] = len(group)
        benchmarks[name] = stats
    return benchmarks


def stderr_of_mean(errors: list) -> float | None:
    """The standard error of the unweighted mean of B independent estimates with standard errors
    e_b: sqrt(sum of e_b^2) / B. None if any e_b is None."""
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def average(benchmarks: dict) -> tuple[float | None, float | None]:
    """The unweighted mean of the benchmark accuracies (the paper's Avg) and its standard error
    (the benchmarks are independent samples)."""
    if not benchmarks:
        return None, None
    value = sum(b["accuracy"] for b in benchmarks.values()) / len(benchmarks)
    return value, stderr_of_mean([b.get("accuracy_stderr") for b in benchmarks.values()])


def markdown_table(benchmarks: dict) -> str:
    """Benchmarks as columns like the paper's tables, Avg last; one line per metric, fractions 0-1
    with 4 decimals as lmms-eval prints them. The Avg of a `_stderr` line is the standard error of
    the Avg above it (average()).

    Kept by hand: pandas' DataFrame.to_markdown needs the tabulate package, a dependency for these
    ten lines, and still leaves the Avg column and the number format to write.
    """
    names = list(benchmarks)
    metrics = [m for m in next(iter(benchmarks.values()), {}) if m != "samples"]
    lines = ["| metric (0-1) | " + " | ".join(names) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    for metric in metrics:
        values = [benchmarks[name].get(metric) for name in names]
        known = [v for v in values if v is not None]
        cells = ["-" if v is None else f"{v:.4f}" for v in values]
        if metric.endswith("_stderr"):
            avg = stderr_of_mean(values)
        else:
            avg = sum(known) / len(known) if known else None
        cells.append("-" if avg is None else f"{avg:.4f}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 3b. results.json and the samples files, in lmms-eval's layout
# ---------------------------------------------------------------------------------------------
# The writer we follow is lmms-eval's: lmms_eval/evaluator.py (evaluate's results_dict and
# simple_evaluate's config), lmms_eval/loggers/evaluation_tracker.py (save_results_aggregated adds
# task_hashes and GeneralConfigTracker's fields; save_results_samples writes one
# `{date}_samples_{task}.jsonl` per task). Each benchmark is one of its tasks; the paper's Avg is
# one of its groups.

FILTER = "none"  # lmms-eval keys a value "<metric>,<filter>"; our only filter is the grading rule
TASK_VERSION = 1  # lmms-eval's per-task version: raised when reward.py's prompt or grading changes
AVERAGE = "average"  # the paper's Avg, as a group of every benchmark


def lmms_config(model, backend, batch_size, device, gen_kwargs, seed, cli_args: dict) -> dict:
    """lmms-eval's `config` (simple_evaluate): every key it writes, None where we have no such
    thing; `resolved_cli_args` holds our settings, as lmms-eval keeps its command line there."""
    return {"model": model, "model_args": None if model is None else f"pretrained={model}",
            "model_backend": backend, "batch_size": batch_size, "batch_sizes": [], "device": device,
            "use_cache": None, "limit": None, "offset": 0, "bootstrap_iters": 0,
            "process_docs_parallel": None, "gen_kwargs": gen_kwargs, "random_seed": seed,
            "numpy_seed": None, "torch_seed": seed, "fewshot_seed": None, "resolved_cli_args": cli_args}


def doc_hash(line: dict) -> str:
    """lmms-eval's doc_hash: the SHA-256 of the row as JSON (indent 2). Our row is the line's data
    fields: the model's outputs are not part of the document."""
    doc = {key: line[key] for key in ("dataset_name", "dataset_index", "prompt", "options",
                                      "answer_label", "answer") if key in line}
    text = json.dumps(doc, indent=2, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sample_record(line: dict) -> dict:
    """One line of a samples file, after save_results_samples: doc_id, target (a string), resps and
    filtered_resps (the K responses and the K answers the grading rule extracted; resps is left out
    when they are equal, as there), token_counts (one request, not counted), doc_hash, the row's
    metrics (per_row_metrics) and input (the prompt)."""
    record = {"doc_id": line.get("dataset_index"), "target": str(line["answer_label"]),
              "resps": line["responses"], "filtered_resps": line["preds"], "token_counts": [None],
              "doc_hash": doc_hash(line), **per_row_metrics(line), "input": line.get("prompt")}
    if record["resps"] == record["filtered_resps"]:
        del record["resps"]
    return record


def results_file(lines: list[dict], samples: dict, skipped: list[dict], config: dict, task_config: dict,
                 date: str, started: float, chat_template: str | None) -> dict:
    """results.json: lmms-eval's keys (results, groups, group_subtasks, configs, versions, n-shot,
    higher_is_better, n-samples, config, git_hash, git_branch, lmms_eval_version, date, usage,
    task_hashes and GeneralConfigTracker's),
    lm-evaluation-harness's `transformers_version`, and `skipped` (rows the data check refused),
    which neither has. Every share is a fraction 0-1. `samples`: each benchmark's sample records
    (sample_record), whose doc hashes make its task hash as save_results_aggregated makes it.

    The group's standard error is stderr_of_mean: the paper's Avg weighs the benchmarks equally, so
    lmms-eval's pooled_sample_stderr (for a mean weighted by size) would be the wrong one."""
    benchmarks = summarize(lines)
    avg, avg_stderr = average(benchmarks)
    k = len(lines[0]["responses"]) if lines else 1
    counts = Counter(line["dataset_name"] for line in lines)
    refused = Counter(row.get("dataset_name") for row in skipped)
    results = {}
    if benchmarks:
        results[AVERAGE] = {"alias": AVERAGE, f"accuracy,{FILTER}": avg, f"accuracy_stderr,{FILTER}": avg_stderr,
                            "samples": len(lines)}
    for name, stats in benchmarks.items():
        results[name] = {"alias": f" - {name}", **{f"{m},{FILTER}": v for m, v in stats.items() if m != "samples"},
                         "samples": stats["samples"]}
    metrics = [m for m in next(iter(benchmarks.values()), {}) if not m.endswith("_stderr") and m != "samples"]
    hashes = {name: hashlib.sha256("".join(f"sample_{i}" + record["doc_hash"] for i, record in
                                           enumerate(samples[name])).encode()).hexdigest() for name in benchmarks}
    model, ended = config["model"], time.time()
    return {
        "results": results,
        "groups": {AVERAGE: results[AVERAGE]} if benchmarks else {},
        "group_subtasks": {AVERAGE: list(benchmarks)},
        "configs": {name: dict(task_config, task=name, repeats=k, metadata={"version": TASK_VERSION},
                               metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                            for m in metrics]) for name in sorted(benchmarks)},
        "versions": {name: TASK_VERSION for name in sorted([*benchmarks, AVERAGE])},
        "n-shot": {name: 0 for name in sorted(benchmarks)},
        "higher_is_better": {name: {m: True for m in metrics} for name in sorted([*benchmarks, AVERAGE])},
        "n-samples": {name: {"original": counts[name] + refused[name], "effective": counts[name]}
                      for name in benchmarks},
        "config": config,
        "git_hash": runtime.git_hash(),
        "git_branch": runtime.git_hash("--abbrev-ref"),
        "lmms_eval_version": None,  # not written by lmms-eval
        "date": date,
        "usage": None,  # lmms-eval's token usage of API models
        "task_hashes": hashes,
        "model_source": config["model_backend"],
        "model_name": model,
        "model_name_sanitized": None if model is None else re.sub(r"[\"<>:/\|\\?\*\[\]]+", "__", "/".join(model.split("/")[-2:])),
        "system_instruction": None,
        "system_instruction_sha": None,
        "fewshot_as_multiturn": False,
        "chat_template": chat_template,
        "chat_template_sha": None if chat_template is None else hashlib.sha256(chat_template.encode()).hexdigest(),
        "start_time": started,
        "end_time": ended,
        "total_evaluation_time_seconds": str(ended - started),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "skipped": {"count": len(skipped), "rows": skipped},
    }


def benchmarks_of(results: dict, where: str = "results.json") -> dict:
    """The per-benchmark metrics of a results.json (the group left out, `,none` dropped)."""
    if "benchmarks" in results or "groups" not in results:
        raise SystemExit(f"{where}: written by an older evaluate.py (accuracy in percent, not lmms-eval's "
                         f"keys); grade it again: python evaluate.py --regrade FOLDER/predictions.jsonl "
                         f"--output_dir NEW_FOLDER")
    return {name: {m.split(",")[0]: v for m, v in stats.items() if m != "alias"}
            for name, stats in results["results"].items() if name not in results["groups"]}


def average_of(results: dict) -> tuple[float | None, float | None]:
    """The paper's Avg of a results.json and its standard error."""
    group = results["groups"].get(AVERAGE, {})
    return group.get(f"accuracy,{FILTER}"), group.get(f"accuracy_stderr,{FILTER}")


# ---------------------------------------------------------------------------------------------
# 4. Files: append as we go, resume, merge (runtime.read_jsonl, drop_torn_tail, write_lines)
# ---------------------------------------------------------------------------------------------


def saved_lines(out: Path) -> dict:
    """Every row answered so far in DIR, merged or not, by (dataset_name, dataset_index): each
    process appends its own part as it goes (runtime.saved_lines)."""
    return runtime.saved_lines(out, "predictions", lambda line: (line["dataset_name"], line["dataset_index"]))


def finish(out: Path, lines: list[dict], skipped: list[dict], config: dict, task_config: dict,
           started: float, chat_template: str | None = None) -> dict:
    """Write predictions.jsonl, results.json and one `{date}_samples_{benchmark}.jsonl` per
    benchmark (results_file, sample_record), print the table."""
    runtime.write_lines(out / "predictions.jsonl", lines)
    date = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")  # lmms-eval's get_datetime_str, in UTC
    samples: dict[str, list[dict]] = {}
    for line in lines:
        samples.setdefault(line["dataset_name"], []).append(sample_record(line))
    results = results_file(lines, samples, skipped, config, task_config, date, started, chat_template)
    runtime.write_json(out / "results.json", results)
    for old in out.glob("*_samples_*.jsonl"):  # an earlier finish of this same run
        old.unlink()
    for name, records in samples.items():
        runtime.write_lines(out / f"{date}_samples_{name.replace('/', '__')}.jsonl", records)
    avg, avg_stderr = average_of(results)
    error = "" if avg_stderr is None else f" (stderr {avg_stderr:.4f})"
    print(f"\n{config['model'] or config['resolved_cli_args'].get('regrade')}: average accuracy (0-1) "
          f"{'-' if avg is None else f'{avg:.4f}'}{error} over {len(results['group_subtasks'][AVERAGE])} benchmark(s)")
    print(markdown_table(benchmarks_of(results)))
    runtime.write_report(str(out))
    return results


# ---------------------------------------------------------------------------------------------
# 5. The commands
# ---------------------------------------------------------------------------------------------


def regrade_line(line: dict, where: str) -> dict:
    """A saved line in our format, with its responses; the official run_offline_inference.py keeps
    them as parsed_outputs[i]["output_text"] (and no options: those are in its data set)."""
    if "responses" not in line and isinstance(line.get("parsed_outputs"), list):
        outputs = line["parsed_outputs"]
        if all(isinstance(o, dict) and isinstance(o.get("output_text"), str) for o in outputs):
            line = dict(line, responses=[o["output_text"] for o in outputs])
    missing = [k for k in ("dataset_name", "answer_label", "answer", "responses") if k not in line]
    responses = line.get("responses")
    if missing or not isinstance(responses, list) or not responses or \
            not all(isinstance(r, str) for r in responses):
        raise SystemExit(f"{where}: needs dataset_name, answer_label, answer and a non-empty list of "
                         f"responses (or the official parsed_outputs) (missing {missing})")
    return grade(line)


def regrade(args: Args):
    """Grade saved responses again, with no model: a change of grading rule, or another tool's file."""
    started, out = time.time(), Path(args.output_dir)
    fingerprint = {"stage": "evaluate --regrade", "settings": {"regrade": os.path.abspath(args.regrade)},
                   "data": runtime.file_fingerprint(args.regrade, "--regrade")}  # names a missing file
    try:
        lines = [regrade_line(line, f"{args.regrade} line {number}")
                 for number, line in runtime.read_jsonl(args.regrade, complete_only=False)]
    except ValueError as err:
        raise SystemExit(str(err)) from None
    # Regrading is deterministic, so the same run may write its files again; any other folder (a
    # generation run's, say) is refused rather than overwritten.
    runtime.claim_output_dir(str(out), fingerprint, resume=True)
    config = lmms_config(None, None, None, None, None, None, {"regrade": args.regrade})
    task_config = {"dataset_path": args.regrade, "test_split": None, "output_type": "generate_until",
                   "generation_kwargs": None}
    return finish(out, lines, [], config, task_config, started)


def evaluate(args: Args):
    started, out = time.time(), Path(args.output_dir)
    # Generation never communicates across processes; only the barriers below do, and a rank
    # may reach the last one long after the others (gloo's and NCCL's default timeouts are 30/10 min).
    # Accelerator (not PartialState) reads `accelerate launch`'s settings, ACCELERATE_USE_CPU included.
    state = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=48))])
    processor = load_processor(args)
    ds, rows, skipped, data_fingerprint = load_rows(args, processor, state.is_main_process)
    base_dir = runtime.data_dir(args.data)

    # The run folder: saved predictions are reused only by the very same run (same model files,
    # data and settings); another run's folder is refused, naming what differs (section 10).
    # Every rank computes the same fingerprint; the main one claims. If it refuses, it exits
    # with the message and `accelerate launch` stops the others.
    settings = runtime.settings(args)
    fingerprint = {"stage": "evaluate", "settings": settings, "data": data_fingerprint,
                   "model": runtime.model_fingerprint(args.model)}
    if state.is_main_process:
        runtime.claim_output_dir(str(out), fingerprint, resume=True, inputs=(args.data, args.model))
        if skipped:
            runtime.write_bad_rows(skipped, str(out))
            print(f"skipped {len(skipped)} bad row(s) of {len(rows) + len(skipped)}, listed in "
                  f"{out / 'bad_rows.jsonl'}; the first: {skipped[0]['reason']}")
    state.wait_for_everyone()

    done = saved_lines(out)
    state.wait_for_everyone()  # every process has read what is done before any writes more
    # A batch is run again whole if any of its rows is missing, so that every row is answered in
    # the same batch as in an uninterrupted run; only the missing rows are written.
    pending = [b for b in make_batches(rows, args.batch_size) if any(r.key not in done for r in b)]
    mine = pending[state.process_index :: state.num_processes]  # round robin: lengths balance
    if args.engine == "vllm":
        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
        # With several processes every one builds its engine (vLLM makes its process groups then),
        # work or not.
        model = engine.VLLM(args.model, dtype, args.seed, max(r.length for r in rows) + args.max_new_tokens,
                            args.vllm_memory, engine.max_images(ds), processes=state.num_processes) \
            if mine or state.num_processes > 1 else None
    else:
        model = load_model(args, state.device) if mine else None
    # Every generate setting explicit, the same as grpo.py's (docs/method.md section 9): the paper's
    # sampler (vLLM with explicit SamplingParams) used temperature T, top_p, no top_k and no
    # repetition penalty, whatever the checkpoint's generation_config.json says; 0 = greedy.
    gen_kwargs = reward.generation_kwargs(args.temperature, args.top_p, args.max_new_tokens,
                                          reward.never_generate_ids(processor.tokenizer))
    eos_ids = engine.end_of_turn_ids(args.model) if args.engine == "vllm" else None

    stored = stored_rows(ds)
    part = out / f"predictions.rank{state.process_index}.jsonl"
    runtime.drop_torn_tail(part)
    n_rows = sum(len(b) for b in mine)
    bar = tqdm(total=n_rows, unit="row", desc=f"rank {state.process_index}",
               disable=not state.is_main_process)
    generating = time.time()
    with open(part, "a", encoding="utf-8") as f:
        for batch in mine:
            rows_read = [reward.check_row(row, base_dir)
                         for row in stored[[r.position for r in batch]].to_pylist()]
            if args.engine == "vllm":
                seeds = [row_seed(args.seed, r) if args.temperature > 0 else None for r in batch]
                responses = generate_vllm(model, processor, rows_read, args.n, gen_kwargs, eos_ids, seeds)
            else:
                responses = generate(model, processor, rows_read, args.n, gen_kwargs,
                                     batch_seed(args.seed, batch), args.share_prompt)
            prompts, _ = reward.chat_prompts(processor, rows_read)
            new = []
            for r, row, prompt, answered in zip(batch, rows_read, prompts, responses):
                if r.key not in done:
                    line = {k: row[k] for k in ("dataset_name", "dataset_index", "answer_label", "answer")}
                    line.update(options=reward.parse_options(row), prompt=prompt, responses=answered)
                    new.append(grade(line))
            # One write per batch, flushed: a line is done once its newline is on disk.
            f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in new))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
            stop = runtime.stop_requested()  # SIGTERM: every finished row is on disk; the rest waits
            if stop:
                bar.close()
                print(f"rank {state.process_index}: stopped by {stop}; its finished rows are in {part}. "
                      "Run the same command again to answer the rest.")
                raise SystemExit(runtime.STOPPED)
    bar.close()
    if n_rows:
        seconds = time.time() - generating
        print(f"rank {state.process_index}: {n_rows} rows in {seconds:.1f} s "
              f"({n_rows / seconds:.2f} rows/s, batch size {args.batch_size})")

    state.wait_for_everyone()
    results = None
    if state.is_main_process:
        found = saved_lines(out)
        missing = [r.key for r in rows if r.key not in found]
        if missing:
            raise RuntimeError(f"{len(missing)} rows have no predictions, e.g. {missing[:3]}")
        lines = [found[r.key] for r in rows]  # dataset order, whatever the processes did
        config = lmms_config(args.model, args.engine, args.batch_size, state.device.type, gen_kwargs, args.seed,
                             dict(settings, model=args.model, data=args.data))
        task_config = {"dataset_path": args.data, "test_split": args.split, "output_type": "generate_until",
                       "generation_kwargs": gen_kwargs}
        results = finish(out, lines, skipped, config, task_config, started, processor.chat_template)
        for path in runtime.part_files(out, "predictions"):  # merged: predictions.jsonl holds every line
            os.remove(path)
    state.wait_for_everyone()
    runtime.release_output_dir(str(out))
    return results


def named(items: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = [item.split("=", 1) for item in items]
    for item, pair in zip(items, pairs):
        if len(pair) != 2 or not all(pair):
            raise SystemExit(f"{flag} {item!r}: expected NAME=VALUE")
    return [tuple(pair) for pair in pairs]


def compare(args: Args):
    """One row per model, benchmarks as columns and Avg last, like the paper's tables.

    A paper row has only its average (docs/method.md section 8 lists the paper's averages).
    This writes only views of finished runs (summary.json, summary.md, curves.png), recomputed
    from their results each time, into a folder that usually holds those runs (the recipe's run
    folder): it is not claimed as a run folder of its own.
    """
    summary = {}
    for name, folder in named(args.compare, "--compare"):
        path = Path(folder) / "results.json"
        if not path.exists():
            raise SystemExit(f"--compare {name}: {path} does not exist (run the evaluation first)")
        results = json.loads(path.read_text())
        benchmarks = benchmarks_of(results, str(path))
        avg, avg_stderr = average_of(results)
        summary[name] = {"benchmarks": benchmarks, "average": avg, "average_stderr": avg_stderr}
    papers = []
    for name, value in named(args.paper, "--paper"):
        try:
            papers.append((name, float(value)))
        except ValueError:
            raise SystemExit(f"--paper {name}={value}: the average is not a number") from None
        if not 0 <= papers[-1][1] <= 1:
            raise SystemExit(f"--paper {name}={value}: give the paper's Avg as a fraction 0-1, as every "
                             f"table here (the paper prints percent: 53.19 is 0.5319)")
    names = list(dict.fromkeys(b for r in summary.values() for b in r["benchmarks"]))
    cell = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    header = ["| model | " + " | ".join(names) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    table = ["Accuracy (0-1):", "", *header]
    for metric in ("accuracy", "consistency"):
        if metric == "consistency":  # answers that agree with their own reasoning (section 11)
            table += ["", "Answer agrees with the reasoning (consistency, 0-1):", "", *header]
        for name, result in summary.items():
            values = [result["benchmarks"].get(b, {}).get(metric) for b in names]
            known = [v for v in values if v is not None]
            avg = result["average"] if metric == "accuracy" else (sum(known) / len(known) if known else None)
            table.append(f"| {name} | " + " | ".join(map(cell, values)) + f" | {cell(avg)} |")
        if metric == "accuracy":
            for name, value in papers:
                table.append(f"| {name} (paper) | " + " | ".join("-" for _ in names) + f" | {value:.4f} |")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime.write_json(out / "summary.json", summary)
    (out / "summary.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))
    if args.curves:
        plot_curves(args.curves, out / "curves.png")
    return summary


def plot_curves(curves: list[str], path: Path):
    """Training curves, one panel per LABEL=metrics.jsonl:KEY (steps without KEY are left out;
    runtime.draw_curves draws them)."""
    panels = []
    for label, spec in named(curves, "--curves"):
        file, _, key = spec.rpartition(":")
        if not file:
            raise SystemExit(f"--curves {label}={spec}: expected LABEL=metrics.jsonl:KEY")
        if not os.path.isfile(file):
            raise SystemExit(f"--curves {label}: {file} does not exist")
        steps = [line for _, line in runtime.read_jsonl(file, complete_only=True) if line.get(key) is not None]
        if not steps:
            raise SystemExit(f"--curves {label}: no step of {file} has {key!r}")
        panels.append((label, steps, key))
    runtime.draw_curves(panels, path)
    print(f"curves: {path}")


def main(argv=None):
    args = runtime.parse_args(Args, argv=argv)  # a YAML/JSON file first (configs/eval.yaml), flags override
    if args.report:
        path = runtime.write_report(args.output_dir)
        print(f"report: {path}")
        return path
    if args.compare:
        return compare(args)
    if args.regrade:
        if args.model or args.data:
            raise SystemExit("--regrade grades saved responses: give no --model or --data")
        return regrade(args)
    if not (args.model and args.data):
        raise SystemExit("give --model and --data (or --regrade FILE)")
    if args.n < 1 or args.batch_size < 1:
        raise SystemExit("--n and --batch_size must be at least 1")
    runtime.refuse_below_one(args, ("max_new_tokens",))
    runtime.refuse_bad_sampling(args.temperature, args.top_p)
    if args.n > 1 and args.temperature <= 0:
        raise SystemExit("--n > 1 needs --temperature > 0: greedy samples would all be the same")
    if args.engine == "vllm":  # before any work
        engine.check_vllm()
    runtime.check_model(args.model)
    return evaluate(args)


if __name__ == "__main__":
    runtime.run_main(main)
