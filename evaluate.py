"""Evaluation: benchmark accuracy, pass counts and teacher samples with one inference engine.

MedVLThinker (arXiv 2508.02669) reports greedy accuracy per benchmark and their unweighted mean
(Tables 2-4), filters training data by a pass count over 16 samples at T 1.0 (Section 3.2), and
distils reasoning traces from the first correct of 3 teacher samples. All three are "answer every
row K times and grade each answer", so this one script does them (DESIGN.md sections 4, 7, 8):

    python evaluate.py --model M --data D --split test --out DIR                    # greedy
    python evaluate.py --model M --data D --split train --n 16 --temperature 1.0 --out DIR
    accelerate launch evaluate.py --model M --data D --out DIR                      # rows split
    python evaluate.py --regrade DIR/predictions.jsonl --out DIR2                   # no model
    python evaluate.py --compare base=DIR1 grpo=DIR2 --out DIR3                     # one table

DIR receives `predictions.jsonl` (one line per row: the K responses, extracted answers, 0/1
grades and answer-reasoning agreement) and `results.json` (per benchmark accuracy, maj@K, pass@K,
format and consistency rates; the unweighted average), and a markdown table is printed.

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
  --batch-size; across seeds or batch sizes only their statistics agree.
"""

import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser

import reward


@dataclass
class EvalArgs:
    out: str = field(metadata={"help": "Folder for predictions.jsonl, results.json, settings.json."})
    model: str | None = field(default=None, metadata={"help": "Hub id or save_pretrained folder."})
    data: str | None = field(default=None, metadata={
        "help": "Hub id, save_to_disk folder, or a parquet/jsonl file in the schema of DESIGN.md 2."})
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
        "help": "A row with a missing/undecodable image or malformed options: stop, or skip and count it."})
    regrade: str | None = field(default=None, metadata={
        "help": "A predictions.jsonl to grade again (no model); its lines need dataset_name, "
                "answer_label, answer, responses."})
    dtype: str = field(default="auto", metadata={"help": "auto = bfloat16 on CUDA, float32 on CPU."})
    compare: list[str] = field(default_factory=list, metadata={
        "help": "NAME=DIR ... of finished evaluations (no model): one table, one row per model, "
                "written with DIR/summary.json as {NAME: {benchmarks, average}}."})
    paper: list[str] = field(default_factory=list, metadata={
        "help": "With --compare: NAME=AVG rows of the paper to print beside ours."})
    curves: list[str] = field(default_factory=list, metadata={
        "help": "With --compare: LABEL=metrics.jsonl:KEY ... one panel each in DIR/curves.png."})


# ---------------------------------------------------------------------------------------------
# 1. Rows: read, check, order into batches
# ---------------------------------------------------------------------------------------------


def open_image(item) -> Image.Image:
    """A schema image (PIL, {"bytes", "path"} dict, or file path) as a fully decoded RGB image."""
    if item is None:
        raise ValueError("an image is missing (None)")
    if isinstance(item, dict):  # how the datasets Image feature stores an image undecoded
        item = io.BytesIO(item["bytes"]) if item.get("bytes") else item.get("path")
    image = item if isinstance(item, Image.Image) else Image.open(item)
    image = image.convert("RGB")  # decodes every pixel: a truncated file fails here, not mid-run
    # Qwen2.5-VL's processor refuses an aspect ratio over 200 (smart_resize raises).
    if max(image.size) / min(image.size) > 200:
        raise ValueError(f"image of {image.size[0]}x{image.size[1]} px: aspect ratio over 200")
    return image


def read_row(ds, i: int) -> dict:
    """Row i with its images decoded and its options checked; a RowError names the row."""
    try:
        row = ds[i]
    except Exception as err:  # the datasets Image feature decodes on access
        meta = ds.select_columns(["dataset_name", "dataset_index"])[i]
        raise reward.RowError(f"{reward.row_name(meta)}: cannot be read ({err})") from None
    reward.parse_options(row)
    try:
        row["images"] = [open_image(item) for item in row.get("images") or []] or None
    except Exception as err:
        raise reward.RowError(f"{reward.row_name(row)}: {err}") from None
    return row


@dataclass
class Row:
    position: int  # in the dataset (after --limit)
    key: tuple  # (dataset_name, dataset_index): what resuming and the predictions file join on
    length: int  # prompt tokens, estimated: text tokens + one token per 28 x 28 px of image


def check_rows(ds, processor, on_bad_row: str) -> tuple[list[Row], list[dict]]:
    """Read every row once before any generation, so a long run never dies on row 40,000.

    Returns the good rows and the skipped ones; with on_bad_row="error" any bad row raises,
    naming all of them. Duplicate (dataset_name, dataset_index) keys are always an error.
    """
    rows, bad, seen = [], [], set()
    names, indices = ds["dataset_name"], ds["dataset_index"]
    for i in range(len(ds)):
        try:
            row = read_row(ds, i)
        except reward.RowError as err:
            bad.append({"dataset_name": names[i], "dataset_index": indices[i], "reason": str(err)})
            continue
        key = (row["dataset_name"], row["dataset_index"])
        if key in seen:
            raise ValueError(f"{reward.row_name(row)} occurs twice: rows must have unique keys")
        seen.add(key)
        text = processor.apply_chat_template(reward.build_messages(row), add_generation_prompt=True,
                                             tokenize=False)
        # Qwen2.5-VL: one token per 28 x 28 px after the 2 x 2 merge; only used to order rows.
        pixels = sum(image.size[0] * image.size[1] for image in row["images"] or [])
        length = len(processor.tokenizer(text)["input_ids"]) + pixels // (28 * 28)
        rows.append(Row(i, key, length))
    if bad and on_bad_row == "error":
        listed = "\n".join(b["reason"] for b in bad[:20])
        more = f"\n... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise reward.RowError(f"{len(bad)} bad row(s); pass --on-bad-row skip to skip them:\n{listed}{more}")
    return rows, bad


def make_batches(rows: list[Row], batch_size: int) -> list[list[Row]]:
    """Longest prompts first (an out-of-memory error shows at once), ties in dataset order."""
    ordered = sorted(rows, key=lambda r: (-r.length, r.position))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def batch_seed(seed: int, batch: list[Row]) -> int:
    """The sampling seed of a batch: from --seed and its first row, whoever runs it and when."""
    name, index = batch[0].key
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------
# 2. Generation
# ---------------------------------------------------------------------------------------------


def load_processor(args: EvalArgs):
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"  # generation continues every prompt at its end
    return processor


def load_model(args: EvalArgs, device):
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def generation_kwargs(args: EvalArgs, tokenizer) -> dict:
    """Every sampling setting explicit (DESIGN.md section 9).

    generate() fills any setting left unset from the checkpoint's generation_config.json, and the
    Qwen2.5-VL checkpoints ship near-greedy sampling defaults and a repetition penalty; with
    do_sample=True transformers would also apply top_k=50. The paper's sampler (vLLM with explicit
    SamplingParams) used none of these: temperature T, top_p, no top_k, no repetition penalty.
    """
    kwargs = dict(
        max_new_tokens=args.max_new_tokens, repetition_penalty=1.0,
        # A vision special in a completion makes the next forward pass fail ("Image features and
        # image tokens do not match") and <|im_start|> would open a new turn: never generate them.
        # GRPO masks the same ids, so sampling here and there draws from the same distribution.
        suppress_tokens=reward.never_generate_ids(tokenizer),
    )
    if args.temperature > 0:
        return dict(kwargs, do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    return dict(kwargs, do_sample=False, temperature=1.0, top_p=1.0)  # greedy: no warper applies


def generate(model, processor, rows: list[dict], n: int, gen_kwargs: dict, seed: int) -> list[list[str]]:
    """K responses per row: prompts and images repeated K times before the processor call.

    Repeating before the processor (rather than num_return_sequences, which expands pixel_values
    inside generate only) keeps one prompt per sequence everywhere (DESIGN.md section 9).
    The processor gets only real images, so a batch may mix image and text-only rows, and it
    returns mm_token_type_ids, without which Qwen2.5-VL falls back to 1-D positions.
    """
    repeated = [row for row in rows for _ in range(n)]
    texts, images = reward.chat_prompts(processor, repeated)
    inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    torch.manual_seed(seed)
    output = model.generate(**inputs, **gen_kwargs)
    completions = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :],
                                         skip_special_tokens=True)
    return [completions[i * n : (i + 1) * n] for i in range(len(rows))]


# ---------------------------------------------------------------------------------------------
# 3. Grading (reward.py's evaluation rule) and the summary
# ---------------------------------------------------------------------------------------------


def option_letter(pred: str, options: dict) -> str | None:
    """The letter an extracted answer names, by reward.is_correct's equality; first match wins."""
    for letter, text in options.items():
        if reward.is_correct(pred, letter, text):
            return letter
    return None


def think_text(response: str) -> str | None:
    """The text before the first </think>, after the last <think> before it; None if unclosed."""
    end = response.find("</think>")
    if end < 0:
        return None
    start = response.rfind("<think>", 0, end)
    return response[start + len("<think>") if start >= 0 else 0 : end]


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
    """Add `preds`, `correct` and `consistent` (one per response) to a predictions line.

    consistent: 1 when the answer's letter is the option the reasoning (think text) names last,
    0 when the reasoning names another option (or the answer is no option), null when the
    reasoning names none or there are no options. GRPO's reward never reads the reasoning, so
    this shows answers drifting away from it (DESIGN.md section 10).
    """
    options = reward.parse_options(line) if line.get("options") is not None else {}
    preds = [reward.extract_answer(response) for response in line["responses"]]
    consistent = []
    for response, pred in zip(line["responses"], preds):
        thought = think_text(response)
        named = option_named_last(thought, options) if thought is not None else None
        consistent.append(None if named is None else int(option_letter(pred, options) == named))
    return dict(line, preds=preds,
                correct=[int(reward.is_correct(p, line["answer_label"], line["answer"])) for p in preds],
                consistent=consistent)


def majority_correct(line: dict) -> int:
    """maj@K: vote over the K answers, each as its option letter where it names one (else its
    stripped lowercased text); ties go to the answer seen first; 1 if the vote is correct."""
    options = reward.parse_options(line) if line.get("options") is not None else {}
    votes = [option_letter(p, options) or p.strip().lower() for p in line["preds"]]
    vote = Counter(votes).most_common(1)[0][0]  # most_common keeps first-seen order among ties
    return int(reward.is_correct(vote, line["answer_label"], line["answer"]))


def mean(values) -> float | None:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else None


def summarize(lines: list[dict]) -> tuple[dict, float | None]:
    """Per benchmark (dataset_name, in order of first appearance) percentages, and the average.

    accuracy = mean over rows of the fraction of correct responses (plain accuracy when K = 1);
    maj@K and pass@K (K > 1) = share of rows whose majority vote / any response is correct;
    format_rate = share of responses passing reward.format_ok; consistency = mean of non-null
    `consistent` values. The average is the unweighted mean of the accuracies (as the paper).
    """
    ks = {len(line["responses"]) for line in lines}
    if len(ks) > 1:
        raise ValueError(f"rows have different numbers of responses {sorted(ks)}: grade them separately")
    k = ks.pop() if ks else 1
    groups: dict[str, list[dict]] = {}
    for line in lines:
        groups.setdefault(line["dataset_name"], []).append(line)
    benchmarks = {}
    for name, group in groups.items():
        stats = {"accuracy": mean(sum(g["correct"]) / k for g in group), "n": len(group)}
        if k > 1:
            stats[f"maj@{k}"] = mean(majority_correct(g) for g in group)
            stats[f"pass@{k}"] = mean(max(g["correct"]) for g in group)
        stats["format_rate"] = mean(reward.format_ok(r) for g in group for r in g["responses"])
        stats["consistency"] = mean(c for g in group for c in g["consistent"] if c is not None)
        benchmarks[name] = stats
    average = sum(b["accuracy"] for b in benchmarks.values()) / len(benchmarks) if benchmarks else None
    return benchmarks, average


def markdown_table(benchmarks: dict) -> str:
    """Benchmarks as columns like the paper's tables, Avg last; one line per metric."""
    names = list(benchmarks)
    metrics = [m for m in next(iter(benchmarks.values()), {}) if m != "n"]
    lines = ["| | " + " | ".join(names) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    for metric in metrics:
        values = [benchmarks[name][metric] for name in names]
        known = [v for v in values if v is not None]
        cells = ["-" if v is None else f"{v:.2f}" for v in values]
        cells.append(f"{sum(known) / len(known):.2f}" if known else "-")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 4. Files: append as we go, resume, merge
# ---------------------------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict]:
    """The complete lines of one of our own predictions files; a last line without its newline
    (the process was killed while writing it) is not done and is ignored."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def drop_torn_tail(path: Path):
    """Cut a partial last line off before appending to a file again."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def part_files(out: Path) -> list[Path]:
    return sorted(out.glob("predictions.rank*.jsonl"))


def saved_lines(out: Path) -> dict:
    """Every row answered so far in DIR, merged or not, by (dataset_name, dataset_index)."""
    found = {}
    for path in [out / "predictions.jsonl", *part_files(out)]:
        for line in read_lines(path):
            found.setdefault((line["dataset_name"], line["dataset_index"]), line)
    return found


def check_settings(out: Path, settings: dict):
    """A resumed run must have the arguments that produced the rows already there."""
    saved = out / "settings.json"
    if saved.exists():
        previous = json.loads(saved.read_text())
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {old!r} before, {new!r} now" for k, (old, new) in changed.items())
            raise SystemExit(f"{out} holds a run with other settings ({listed}). Resume with the "
                             "same arguments, or give another --out.")
    elif (out / "predictions.jsonl").exists() or part_files(out):
        raise SystemExit(f"{out} holds predictions without settings.json: give another --out.")


def write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file


def write_lines(path: Path, lines: list[dict]):
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def finish(out: Path, lines: list[dict], skipped: list[dict], info: dict, started: float):
    """Write predictions.jsonl and results.json, print the table."""
    write_lines(out / "predictions.jsonl", lines)
    benchmarks, average = summarize(lines)
    results = {"benchmarks": benchmarks, "average": average,
               "skipped": {"count": len(skipped), "rows": skipped}, **info,
               "seconds": round(time.time() - started, 2)}
    write_json(out / "results.json", results)
    print(f"\n{info.get('model') or info.get('regraded_from')}: average accuracy "
          f"{'-' if average is None else f'{average:.2f}'} over {len(benchmarks)} benchmark(s)")
    print(markdown_table(benchmarks))
    return results


# ---------------------------------------------------------------------------------------------
# 5. The two commands
# ---------------------------------------------------------------------------------------------


def regrade(args: EvalArgs):
    started, out = time.time(), Path(args.out)
    lines = []
    for number, text in enumerate(Path(args.regrade).read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{args.regrade} line {number}: not JSON ({err})") from None
        missing = [k for k in ("dataset_name", "answer_label", "answer", "responses") if k not in line]
        if missing or not isinstance(line.get("responses"), list) or not line["responses"]:
            raise SystemExit(f"{args.regrade} line {number}: needs dataset_name, answer_label, answer "
                             f"and a non-empty list of responses (missing {missing})")
        lines.append(grade(line))
    out.mkdir(parents=True, exist_ok=True)
    return finish(out, lines, [], {"regraded_from": args.regrade}, started)


def evaluate(args: EvalArgs):
    started, out = time.time(), Path(args.out)
    # Generation never communicates across processes; only the two barriers below do, and a rank
    # may reach the last one long after the others (gloo's and NCCL's default timeouts are 30/10 min).
    # Accelerator (not PartialState) reads `accelerate launch`'s settings, ACCELERATE_USE_CPU included.
    state = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=48))])
    settings = {k: v for k, v in asdict(args).items() if k not in ("out", "regrade")}
    check_settings(out, settings)  # every rank reads, none writes yet: all refuse or none do

    processor = load_processor(args)
    ds = reward.load_split(args.data, args.split)
    if args.limit is not None:
        ds = ds.select(range(min(args.limit, len(ds))))
    rows, skipped = check_rows(ds, processor, args.on_bad_row)
    if state.is_main_process:
        for bad in skipped:
            print(f"skipping {bad['reason']}", file=sys.stderr)
    done = saved_lines(out)
    # A batch is run again whole if any of its rows is missing, so that every row is answered in
    # the same batch as in an uninterrupted run; only the missing rows are written.
    pending = [b for b in make_batches(rows, args.batch_size) if any(r.key not in done for r in b)]
    mine = pending[state.process_index :: state.num_processes]  # round robin: lengths balance
    out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    if state.is_main_process:
        write_json(out / "settings.json", settings)
    model = load_model(args, state.device) if mine else None
    gen_kwargs = generation_kwargs(args, processor.tokenizer)

    part = out / f"predictions.rank{state.process_index}.jsonl"
    drop_torn_tail(part)
    n_rows = sum(len(b) for b in mine)
    bar = tqdm(total=n_rows, unit="row", desc=f"rank {state.process_index}",
               disable=not state.is_main_process)
    generating = time.time()
    with open(part, "a", encoding="utf-8") as f:
        for batch in mine:
            rows_read = [read_row(ds, r.position) for r in batch]
            seed = batch_seed(args.seed, batch)
            responses = generate(model, processor, rows_read, args.n, gen_kwargs, seed)
            new = []
            for r, row, answered in zip(batch, rows_read, responses):
                if r.key not in done:
                    line = {k: row[k] for k in ("dataset_name", "dataset_index", "answer_label", "answer")}
                    line.update(options=reward.parse_options(row), responses=answered)
                    new.append(grade(line))
            # One write per batch, flushed: a line is done once its newline is on disk.
            f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in new))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
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
        info = {"model": args.model, "data": args.data, "split": args.split, "settings": settings}
        results = finish(out, lines, skipped, info, started)
        for path in part_files(out):  # merged: predictions.jsonl now holds every line
            path.unlink()
    state.wait_for_everyone()
    return results


def named(items: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = [item.split("=", 1) for item in items]
    for item, pair in zip(items, pairs):
        if len(pair) != 2 or not all(pair):
            raise SystemExit(f"{flag} {item!r}: expected NAME=VALUE")
    return [tuple(pair) for pair in pairs]


def compare(args: EvalArgs):
    """One row per model, benchmarks as columns and Avg last, like the paper's tables.

    A paper row has only its average (DESIGN.md section 8 lists the paper's averages).
    """
    summary = {}
    for name, folder in named(args.compare, "--compare"):
        path = Path(folder) / "results.json"
        if not path.exists():
            raise SystemExit(f"--compare {name}: {path} does not exist (run the evaluation first)")
        results = json.loads(path.read_text())
        summary[name] = {"benchmarks": results["benchmarks"], "average": results["average"]}
    names = list(dict.fromkeys(b for r in summary.values() for b in r["benchmarks"]))
    cell = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    table = ["| model | " + " | ".join(names) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    for metric in ("accuracy", "consistency"):
        if metric == "consistency":  # answers that agree with their own reasoning (DESIGN.md 10)
            table += ["", "Answer agrees with the reasoning (consistency, %):", "", *table[:2]]
        for name, result in summary.items():
            values = [result["benchmarks"].get(b, {}).get(metric) for b in names]
            known = [v for v in values if v is not None]
            avg = result["average"] if metric == "accuracy" else (sum(known) / len(known) if known else None)
            table.append(f"| {name} | " + " | ".join(map(cell, values)) + f" | {cell(avg)} |")
        if metric == "accuracy":
            for name, average in named(args.paper, "--paper"):
                table.append(f"| {name} (paper) | " + " | ".join("-" for _ in names) + f" | {float(average):.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))
    if args.curves:
        plot_curves(args.curves, out / "curves.png")
    return summary


def plot_curves(curves: list[str], path: Path):
    """Training curves, one panel per LABEL=metrics.jsonl:KEY (steps without KEY are left out).

    matplotlib is the project's one dependency beyond the paper's stack, for this picture only.
    """
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    panels = named(curves, "--curves")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (label, spec) in zip(axes[0], panels):
        file, _, key = spec.rpartition(":")
        if not file:
            raise SystemExit(f"--curves {label}={spec}: expected LABEL=metrics.jsonl:KEY")
        steps = [line for line in read_lines(Path(file)) if line.get(key) is not None]
        if not steps:
            raise SystemExit(f"--curves {label}: no step of {file} has {key!r}")
        ax.plot([line.get("step", i + 1) for i, line in enumerate(steps)], [line[key] for line in steps])
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"curves: {path}")


def main(argv=None):
    (args,) = HfArgumentParser(EvalArgs).parse_args_into_dataclasses(argv)
    if args.compare:
        return compare(args)
    if args.regrade:
        if args.model or args.data:
            raise SystemExit("--regrade grades saved responses: give no --model or --data")
        return regrade(args)
    if not (args.model and args.data):
        raise SystemExit("give --model and --data (or --regrade FILE)")
    if args.n < 1 or args.batch_size < 1:
        raise SystemExit("--n and --batch-size must be at least 1")
    if args.n > 1 and args.temperature <= 0:
        raise SystemExit("--n > 1 needs --temperature > 0: greedy samples would all be the same")
    return evaluate(args)


if __name__ == "__main__":
    main()
