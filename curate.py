"""Data curation: normalise sources to the schema, filter by difficulty, distil reasoning traces.

MedVLThinker (arXiv 2508.02669; docs/method.md section 7) trains on medical multiple-choice
questions that all share one schema (section 2), keeps for RL only the questions the base model
solves sometimes but not often, and distils SFT traces by rejection sampling. Each step below
follows one official script of UCSC-VLAA/MedVLThinker (data_process/train_dataset/, commit
a3163b1), and each says where it differs. One subcommand per step:

    prepare  PMC-VQA's raw CSV + figures (prepare_pmc_vqa.py + resize_image.py), a set already in
             the schema, or another multiple-choice set (a column mapping) -> schema rows.
    filter   pass counts from a predictions file (16 samples at T 1.0 of the base model), graded as
             eval/run_offline_inference.py does; keep 1 <= pass_count <= 7; shuffle with seed 42,
             then easiest first (assign_pass_count.py + order_easy_to_hard.py).
    traces   from a teacher's predictions file, the think text of the first correct sample becomes
             `reasoning` (merge_pmc_vqa_cot.py).
    split    hold out a validation slice (the paper validated on 400 items of the eval set).
    mix      concatenate sets that share the schema (e.g. m23k + PMC-VQA).

    python curate.py prepare --pmc_csv PMC-VQA/train.csv --image_dir PMC-VQA/figures \
        --output_dir data/pmc
    python curate.py filter --data data/pmc --predictions runs/pass16/predictions.jsonl \
        --output_dir data/pmc_1to7
    python curate.py traces --data data/pmc --predictions runs/teacher/predictions.jsonl \
        --output_dir data/pmc_sft
    python curate.py filter settings.yaml --output_dir data/pmc_1to7   # settings from a YAML/JSON file

The reliability contract (docs/method.md section 10) holds for every subcommand:
- rows are read with `runtime.load_split` (an empty set or a missing column is a named error) and
  checked once with the one row check of reward.py; a bad row is a named error, or with
  `--on_bad_row skip` a counted skip listed in OUTPUT_DIR/bad_rows.jsonl;
- OUTPUT_DIR is claimed with `runtime.claim_output_dir` (run.json: the subcommand, its settings and
  its inputs): a folder of another run, or a non-empty folder of no run, is refused; the same run
  again is done again (every step is deterministic), or reported finished when curate_stats.json,
  written last, is there;
- nothing is written next to the inputs: datasets' map/filter/select run in memory, and the one
  cached pass (prepare's images) caches inside OUTPUT_DIR.
Each output is one `Dataset.save_to_disk` folder (`split`: a DatasetDict) with curate_stats.json
(rows in, kept, dropped per reason).
"""

import collections
import io
import json
import os
import shutil
import string
import sys
from contextlib import contextmanager
from functools import partial
from dataclasses import asdict, dataclass, field
from typing import Literal

import datasets
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

import reward
import runtime

STATS_FILE = "curate_stats.json"  # written last: its presence marks a finished step
IMAGE_CACHE = "images.tmp"  # prepare's resumable image pass, inside OUTPUT_DIR, removed at the end
# The official PMC-VQA conversion strips these from both ends of every cell: whitespace, quotes,
# the no-break space and the hair space. We strip the same characters, so we drop the same rows.
STRIP = string.whitespace + "'\"\xa0\u200a"
PMC_COLUMNS = ("Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer_label")
EXAMPLES_PER_REASON = 20  # row numbers kept in the stats file for each drop reason
BAD_ROW = "bad row (bad_rows.jsonl)"  # the drop reason of a row skipped by the row check
# prepare and traces draw no random number; they take --seed only so that every stage does, and it
# stays out of their run.json (and of prepare's image cache key).
NO_RANDOMNESS = ("prepare", "traces")


def schema_features():
    """The column types of docs/method.md section 2, shared by every output so that sets mix."""
    text = datasets.Value("string")
    return datasets.Features({
        "images": datasets.List(datasets.Image()), "question": text, "options": text,
        "answer_label": text, "answer": text, "reasoning": text, "dataset_name": text,
        "dataset_index": datasets.Value("int64"),
    })


# ---------------------------------------------------------------------------------------------
# Arguments: one dataclass per subcommand; the defaults are the paper's settings.
# ---------------------------------------------------------------------------------------------

OUTPUT_DIR = {"help": "Output folder (save_to_disk) with curate_stats.json; refused if it holds another "
                      "run."}
UNUSED_SEED = {"help": "Not used: this step is deterministic (accepted, as by every stage)."}
ON_BAD_ROW = {"help": "error: a bad row (docs/method.md section 10) stops the step, naming it; skip: "
                      "bad rows are left out, counted and listed in OUTPUT_DIR/bad_rows.jsonl."}


@dataclass
class PrepareArgs:
    output_dir: str = field(metadata=OUTPUT_DIR)
    pmc_csv: str | None = field(default=None, metadata={
        "help": "PMC-VQA's raw CSV (Figure_path, Question, Answer, Choice A-D, Answer_label)."})
    image_dir: str | None = field(default=None, metadata={
        "help": "Folder that image paths are relative to (PMC-VQA's figures; default for --data: "
                "the data's folder)."})
    data: str | None = field(default=None, metadata={
        "help": "A set in the schema or another multiple-choice set: save_to_disk folder, "
                "parquet/jsonl file, or hub id."})
    split: str = "train"
    question_column: str = "question"
    options_column: str = field(default="options", metadata={
        "help": "A dict letter -> text, a list (letters A, B, ... in order), or a JSON string of either."})
    answer_column: str = field(default="answer_label", metadata={
        "help": "The correct answer: an option letter, or else the text of exactly one option."})
    answer_text_column: str = field(default="answer", metadata={
        "help": "When the data has this column, its text must equal the label's option text."})
    image_column: str = field(default="images", metadata={
        "help": "Images: a list of images, one image, or path(s) under --image_dir. A set without "
                "this column is text-only."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Name for every row (default: the data's dataset_name column; for --pmc_csv "
                "PMC-VQA, where the official conversion wrote pmc_vqa)."})
    min_side: int = field(default=28, metadata={"help": "Images with a side under this are scaled up."})
    max_side: int = field(default=1024, metadata={"help": "Else, images with a side over this are "
                                                          "scaled down."})
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata=ON_BAD_ROW)
    num_proc: int | None = field(default=None, metadata={"help": "Processes for the image pass."})
    seed: int = field(default=42, metadata=UNUSED_SEED)


@dataclass
class FilterArgs:
    data: str = field(metadata={"help": "The schema set the pass counts were sampled on."})
    output_dir: str = field(metadata=OUTPUT_DIR)
    predictions: str | None = field(default=None, metadata={
        "help": "evaluate.py's predictions.jsonl (K `responses` a row) or the official "
                "eval_results.jsonl (`parsed_outputs`). Without it, the data's own pass_count "
                "column is used."})
    split: str = "train"
    min_pass: int = 1
    max_pass: int = 7
    pass_from: Literal["inference", "reward", "correct"] = field(default="inference", metadata={
        "help": "inference: count reward.pass_correct (the official pass counts: "
                "eval/run_offline_inference.py's grade, no format check); reward: count "
                "reward.reward == 1 (the training reward, format included); correct: sum the "
                "file's `correct` list (evaluate.py's evaluation grade)."})
    shuffle: bool = field(default=True, metadata={"help": "Shuffle with --seed before ordering, as "
                                                          "the official code always does."})
    order: Literal["easy_to_hard", "hard_to_easy", "none"] = field(default="easy_to_hard", metadata={
        "help": "easy_to_hard: highest pass_count first (the official default); hard_to_easy; "
                "none: keep the (shuffled) order."})
    seed: int = 42
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata=ON_BAD_ROW)


@dataclass
class TracesArgs:
    data: str = field(metadata={"help": "The schema set the teacher answered."})
    predictions: str = field(metadata={"help": "The teacher's predictions.jsonl (k samples a row)."})
    output_dir: str = field(metadata=OUTPUT_DIR)
    split: str = "train"
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata=ON_BAD_ROW)
    seed: int = field(default=42, metadata=UNUSED_SEED)


@dataclass
class SplitArgs:
    data: str = field(metadata={"help": "The set to split (e.g. the eval set)."})
    output_dir: str = field(metadata=OUTPUT_DIR)
    split: str = "train"
    n: int = field(default=400, metadata={
        "help": "Rows held out (the paper validated on 400 eval items; which ones is not published)."})
    seed: int = 42
    held_out_name: str = "validation"
    rest_name: str = "train"
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata=ON_BAD_ROW)


@dataclass
class MixArgs:
    data: list[str] = field(metadata={"help": "Two or more schema sets."})
    output_dir: str = field(metadata=OUTPUT_DIR)
    split: list[str] = field(default_factory=lambda: ["train"], metadata={
        "help": "One split for every set, or one per set."})
    shuffle: bool = False
    seed: int = 42
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata=ON_BAD_ROW)


# ---------------------------------------------------------------------------------------------
# The reliability contract (docs/method.md section 10): the output folder, the row check, the stats.
# ---------------------------------------------------------------------------------------------


def settings_of(command: str, args) -> dict:
    """The arguments that make a step's result (runtime.settings), without an unused --seed."""
    found = runtime.settings(args)
    if command in NO_RANDOMNESS:
        del found["seed"]
    return found


@contextmanager
def claimed(command: str, args, inputs: dict):
    """OUTPUT_DIR claimed for this run (runtime.claim_output_dir); yields True when it is finished.

    The same run again is allowed (resume=True: every step is deterministic, so doing it again gives
    the same files). A step that fails before writing anything but run.json removes it again, so a
    fixed input (a new fingerprint) can go to the same folder.
    """
    out = args.output_dir
    existed = os.path.isdir(out)
    settings = settings_of(command, args)
    runtime.claim_output_dir(out, {"stage": f"curate.py {command}", "settings": settings,
                                  "data": inputs}, resume=True, inputs=input_paths(args))
    finished = os.path.isfile(os.path.join(out, STATS_FILE))
    if finished:
        print(f"{out}: this step is done already (same inputs and settings); nothing to do")
        listed = os.path.join(out, "bad_rows.jsonl")
        if os.path.isfile(listed) and os.path.getsize(listed):
            print(f"  (it skipped bad rows: see {listed})")
    try:
        yield finished
    except BaseException:
        if os.listdir(out) == [runtime.RUN_FILE]:
            os.remove(os.path.join(out, runtime.RUN_FILE))
            if not existed:
                os.rmdir(out)
        raise
    finally:
        runtime.release_output_dir(out)


def input_paths(args) -> list[str]:
    """The folders and files a command reads (its output folder may lie in none of them)."""
    paths = []
    for name in ("data", "pmc_csv", "image_dir", "model", "predictions"):
        value = getattr(args, name, None)
        paths += value if isinstance(value, list) else [value] if value else []
    return paths


def checked(data, args, where: str):
    """(the rows that pass the row check, their bad list), by `reward.check_rows` (it raises, naming
    the rows, unless --on_bad_row skip). Relative image paths resolve against the data's folder.
    A set with no good row left is an error: an empty output must not look like a success."""
    good, bad = reward.check_rows(data, args.on_bad_row, runtime.data_dir(where),
                                  progress=partial(tqdm, desc=f"checking {where}"))
    if not good:
        raise reward.RowError(f"{where}: all {len(data)} rows are bad; the first: {bad[0]['reason']}")
    return good, bad


def refuse_or_list(bad: list, rows_in: int, on_bad_row: str, output_dir: str) -> None:
    """The --on_bad_row policy for bad rows found outside reward.check_rows (prepare's conversion
    and image pass): the same error, or the same bad_rows.jsonl."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"--on_bad_row must be error or skip, got {on_bad_row!r}")
    if bad and on_bad_row == "error":
        listed = "\n".join(b["reason"] for b in bad[:20])
        more = f"\n... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise reward.RowError(f"{len(bad)} bad row(s) of {rows_in}; fix them, or pass --on_bad_row "
                              f"skip to skip them (they are then listed in bad_rows.jsonl):\n"
                              f"{listed}{more}")
    if on_bad_row == "skip":
        runtime.write_bad_rows(bad, output_dir)


def column(data, name: str) -> list:
    """A column as a list, read in one Arrow pass (iterating a datasets Column formats row by row,
    100x slower)."""
    return data[name][:]


def count_drops(drops) -> tuple[dict, dict]:
    """Rows dropped per reason, and the first row numbers of each reason (0-based input rows)."""
    counts, examples = collections.Counter(), collections.defaultdict(list)
    for row, reason in enumerate(drops):
        if reason is not None:
            counts[reason] += 1
            if len(examples[reason]) < EXAMPLES_PER_REASON:
                examples[reason].append(row)
    return dict(counts), dict(examples)


def finish(data, out: str, stats: dict, lines: list[str] = ()) -> None:
    """Save the data, then its stats (last: the step's completion marker); print the summary."""
    data.save_to_disk(out)
    runtime.write_text(os.path.join(out, STATS_FILE), json.dumps(stats, indent=1, ensure_ascii=False))
    print(f"{stats['command']}: kept {stats['kept']} of {stats['rows_in']} rows -> {out}")
    for reason, n in sorted(stats.get("dropped", {}).items(), key=lambda item: -item[1]):
        print(f"  dropped {n:>7}  {reason}  (first rows: {stats['examples'].get(reason, [])[:5]})")
    for line in lines:
        print(line)
    print(f"stats: {os.path.join(out, STATS_FILE)}")


# ---------------------------------------------------------------------------------------------
# prepare, step 1: text columns -> schema columns.
# PMC-VQA's CSV follows the official conversion (prepare_pmc_vqa.py); another set goes through a
# column mapping.
# ---------------------------------------------------------------------------------------------


def read_pmc_csv(path: str):
    """PMC-VQA's CSV as a Dataset of strings; an empty cell stays "" (the official reader's
    `dtype=str, keep_default_na=False`), so "NA" as an answer is not lost to a NaN."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in PMC_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; PMC-VQA's CSV has {list(PMC_COLUMNS)}")
    if len(frame) == 0:
        raise ValueError(f"{path}: the CSV has no rows")
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def parse_pmc_choice(cell: str, letter: str) -> str | None:
    """`" B:Focal uptake "` -> `"Focal uptake"` when the cell names its own column's letter."""
    head, colon, text = cell.strip(STRIP).partition(":")
    if not colon or head.strip(STRIP) != letter:
        return None
    return text.strip(STRIP)


def pmc_to_schema(batch: dict, rows: list[int], dataset_name: str) -> dict:
    """Schema columns from PMC-VQA's CSV columns (batched map, with row numbers).

    `_drop` names the official conversion's drops, which stay drops (counted, not bad rows: the
    official code drops them too): a choice that is not `letter: text` under its own letter, a
    label not among A-D, an answer that is not the label's choice text (after stripping).
    Deviation (ours): a blank question is dropped as well, counted as "empty question". The
    official code keeps it, but the row check (reward.check_row) refuses a blank question in every
    stage, so such a row could never be trained or evaluated on.
    dataset_index is the CSV's data row (0-based); the official code numbered the kept rows
    instead, a deviation that keeps every row traceable to its CSV line (= dataset_index + 2).
    The image stays a path until the image pass.
    """
    out = {k: [] for k in ("images", "question", "options", "answer_label", "answer",
                           "dataset_name", "dataset_index", "_drop", "_bad")}
    for i, path in enumerate(batch["Figure_path"]):
        options = {letter: parse_pmc_choice(batch[f"Choice {letter}"][i], letter) for letter in "ABCD"}
        label = batch["Answer_label"][i].strip(STRIP)
        answer = batch["Answer"][i].strip(STRIP)
        question = batch["Question"][i].strip(STRIP)
        drop = None
        if any(text is None for text in options.values()):
            drop = "bad choice format"
        elif label not in options:
            drop = "answer_label not among A-D"
        elif options[label] != answer:
            drop = "answer text differs from the label's option"
        elif not question:
            drop = "empty question"
        out["images"].append(path)
        out["question"].append(question)
        out["options"].append(json.dumps(options, ensure_ascii=False))
        out["answer_label"].append(label)
        out["answer"].append(answer)
        out["dataset_name"].append(dataset_name)
        out["dataset_index"].append(rows[i])
        out["_drop"].append(drop)
        out["_bad"].append(None)
    return out


def parse_options_cell(value) -> dict | None:
    """A dict letter -> text, a list (letters A, B, ... in order) or a JSON string of either."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, (list, tuple)):
        if len(value) > len(string.ascii_uppercase) or any(v is None for v in value):
            return None
        value = dict(zip(string.ascii_uppercase, value))
    if not isinstance(value, dict):
        return None
    # A struct column (parquet, jsonl) has every key of every row: a row's missing option is None.
    options = {letter: text for letter, text in value.items() if text is not None}
    if not options or not all(isinstance(letter, str) and letter.strip() and isinstance(text, str)
                              for letter, text in options.items()):
        return None
    return options


def resolve_label(cell, options: dict) -> tuple[str | None, str | None]:
    """(letter, None) for an answer cell that is an option letter or exactly one option's text,
    else (None, what is wrong)."""
    if not isinstance(cell, str):
        return None, f"answer {cell!r} is not among the options"
    cell = cell.strip(STRIP)
    if cell in options:
        return cell, None
    letters = [letter for letter, text in options.items() if text.strip(STRIP) == cell]
    if len(letters) == 1:
        return letters[0], None
    return None, (f"answer {cell!r} matches options {letters}" if letters
                  else f"answer {cell!r} is not among the options {list(options)}")


def to_schema(batch: dict, rows: list[int], columns: dict, dataset_name: str | None) -> dict:
    """Schema text columns from a mapped set (batched map); `_bad` says why a row cannot be
    converted at all: options that are no letter -> text mapping, an answer that names no single
    option, no dataset_name, no integer dataset_index (the row number when the data has no
    dataset_index column). Everything else (a blank question, an answer text that is not the
    label's option text, the images) is judged by the row check in the image pass.
    `answer` is the data's answer text where it has one, else the label's option text.
    """
    n = len(rows)
    names = [dataset_name] * n if dataset_name else batch.get("dataset_name", [None] * n)
    indices = batch["dataset_index"] if "dataset_index" in batch else rows
    # An answer column that is also the text column (e.g. text answers in `answer`) gives no
    # separate text to check: the text is then the resolved option's.
    texts = batch.get(columns["answer_text"]) if columns["answer_text"] != columns["answer"] else None
    out = {k: [] for k in ("question", "options", "answer_label", "answer", "dataset_name",
                           "dataset_index", "_drop", "_bad")}
    for i in range(n):
        question, label, bad = batch[columns["question"]][i], None, None
        options = parse_options_cell(batch[columns["options"]][i])
        if options is None:
            bad = f"options {batch[columns['options']][i]!r} are not letter -> text"
        else:
            label, bad = resolve_label(batch[columns["answer"]][i], options)
        index = indices[i]
        if bad is None and not (isinstance(names[i], str) and names[i]):
            bad = "no dataset_name"
        if not isinstance(index, int) or isinstance(index, bool):
            bad, index = bad or f"dataset_index {index!r} is not an integer", None
        answer = texts[i] if texts is not None else options[label] if label else None
        out["question"].append(question if isinstance(question, str) else None)
        out["options"].append(json.dumps(options, ensure_ascii=False) if options else None)
        out["answer_label"].append(label)
        out["answer"].append(answer if isinstance(answer, str) else None)
        out["dataset_name"].append(names[i])
        out["dataset_index"].append(index)
        out["_drop"].append(None)
        out["_bad"].append(bad)
    return out


# ---------------------------------------------------------------------------------------------
# prepare, step 2: images resized as the official code does (resize_image.py), then every row
# through the row check (reward.check_row), which names what is wrong with a bad one.
# ---------------------------------------------------------------------------------------------


def qwen_size(width: int, height: int, min_side: int, max_side: int) -> tuple[int, int, str | None]:
    """Target size of the official `resize_image_to_qwen2_5_vl` (resize_image.py): if/elif.

    If a side is under `min_side`, the shorter side becomes min_side (up); ELSE, if a side is over
    `max_side`, the longer side becomes max_side (down). Never both: 10 x 500 px becomes 28 x 1400
    and stays over 1024. The other side scales with it, truncated with int() as there (the
    max(1, .) only keeps PIL from a zero size; such an image fails the aspect-ratio check anyway).
    """
    if min(width, height) < min_side:
        if width < height:
            return min_side, int(height * (min_side / width)), "up"
        return int(width * (min_side / height)), min_side, "up"
    if max(width, height) > max_side:
        if width > height:
            return max_side, max(1, int(height * (max_side / width))), "down"
        return max(1, int(width * (max_side / height))), max_side, "down"
    return width, height, None


def read_image(source, base_dir: str):
    """(bytes, path, decoded image) of one image cell item, or None when it cannot be read or
    decoded (the row check then names why). A path is resolved as reward.open_image resolves it:
    absolute, else against base_dir, then the working directory."""
    data, path = (source.get("bytes"), source.get("path")) if isinstance(source, dict) else (None, source)
    if data is None:
        if not isinstance(path, str) or not path:
            return None
        candidates = [path] if os.path.isabs(path) else [os.path.join(base_dir, path), path]
        found = next((p for p in candidates if os.path.isfile(p)), None)
        if found is None:
            return None
        with open(found, "rb") as f:
            data = f.read()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # every pixel: a truncated file fails here, not in a training step
    except Exception:  # noqa: BLE001  PIL raises many kinds; reward.open_image names the failure
        return None
    return data, path, image


def encode_resized(image) -> bytes:
    """A resized image's bytes, in the format datasets writes for a PIL image that has none (as the
    official map's output was written): PNG for the modes PNG holds, else TIFF. PNG at compression
    level 1: the same pixels, written about 5x faster than at PIL's default level 6 (a 1024 x 768
    figure: 0.05 s instead of 0.22 s) for files about 20% larger."""
    buffer = io.BytesIO()
    if image.mode in ("1", "L", "LA", "RGB", "RGBA"):
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="TIFF")
    return buffer.getvalue()


def image_pass(batch, image_column: str | None, base_dir: str, min_side: int, max_side: int) -> dict:
    """Images resized and every row checked (batched map over Arrow, so nothing decodes twice).

    An image already within bounds keeps its original bytes; a resized one (BILINEAR, in its own
    mode, as there) is stored by encode_resized. The row check sees the images as the
    model will: a 1 x 500 px figure becomes 28 x 14000, an aspect ratio over 200, a bad row.
    Rows dropped by the conversion are passed over; a None / empty cell is a text-only row.
    """
    text_columns = ("question", "options", "answer_label", "answer", "dataset_name", "dataset_index")
    text = {c: batch.column(c).to_pylist() for c in text_columns}
    drops, bads = batch.column("_drop").to_pylist(), batch.column("_bad").to_pylist()
    cells = batch.column(image_column).to_pylist() if image_column else [None] * len(drops)
    out = {"images": [], "_bad": [], "_resized": []}
    for i, (cell, drop, bad) in enumerate(zip(cells, drops, bads)):
        row = {c: text[c][i] for c in text_columns}
        stored, resized = [], None
        if drop is None and bad is not None:
            bad = f"{reward.row_name(row)}: {bad}"
        elif drop is None:
            sources = [] if cell is None else [cell] if isinstance(cell, (str, dict)) else list(cell)
            seen = []  # what the row check decodes: the (resized) image, or the raw item if unread
            for source in sources:
                loaded = read_image(source, base_dir)
                if loaded is None:
                    seen.append(source)
                    continue
                data, path, image = loaded
                width, height, step = qwen_size(*image.size, min_side, max_side)
                if step:
                    image = image.resize((width, height), Image.BILINEAR)
                    data = encode_resized(image)
                    resized = step
                seen.append(image)
                stored.append({"bytes": data, "path": path})
            try:
                reward.check_row(dict(row, images=seen), base_dir)
            except reward.RowError as err:
                bad = str(err)
            if bad is None and len(stored) < len(sources):  # read_image failed where PIL did not
                bad = f"{reward.row_name(row)}: an image could not be read"
        keep = drop is None and bad is None
        out["images"].append((stored or None) if keep else None)
        out["_bad"].append(bad)
        out["_resized"].append(resized if keep else None)
    return out


def run_image_pass(text, source, image_column: str | None, args: PrepareArgs, base_dir: str):
    """The image pass over every row, cached in OUTPUT_DIR/images.tmp under a key of the inputs
    and settings: a stopped run resumes there (with --num_proc N, finished shards are reused)."""
    features = datasets.Features({"images": schema_features()["images"],
                                  "_bad": datasets.Value("string"),
                                  "_resized": datasets.Value("string")})
    view = text
    if image_column is not None:
        view = datasets.concatenate_datasets([text, source.select_columns([image_column])], axis=1)
    origin = runtime.file_fingerprint(args.pmc_csv, "--pmc_csv") if args.pmc_csv else source._fingerprint
    key = datasets.fingerprint.Hasher.hash([origin, settings_of("prepare", args), base_dir])
    scratch = os.path.join(args.output_dir, IMAGE_CACHE)
    os.makedirs(scratch, exist_ok=True)
    return view.with_format("arrow").map(
        image_pass, batched=True, batch_size=64, writer_batch_size=64, features=features,
        remove_columns=view.column_names, num_proc=args.num_proc, desc="images and row check",
        fn_kwargs=dict(image_column=image_column, base_dir=base_dir, min_side=args.min_side,
                       max_side=args.max_side),
        cache_file_name=os.path.join(scratch, f"images-{key}.arrow"),
    ).with_format(None)


def prepare(args: PrepareArgs) -> None:
    """Schema rows from one source: PMC-VQA's CSV, a schema set, or a mapped multiple-choice set.

    Output: the schema columns (a text-only row has images None; reasoning None where the source
    has none), then the source's other columns untouched. Three kinds of rows leave:
    - PMC-VQA rows the official conversion drops, and blank questions (pmc_to_schema): counted
      drops, whatever --on_bad_row says;
    - bad rows: a row of a mapped set that cannot be converted (to_schema), a row failing the row
      check (reward.check_row, after the resize), a repeated (dataset_name, dataset_index):
      a named error, or with --on_bad_row skip counted and listed in bad_rows.jsonl.
    """
    if (args.pmc_csv is None) == (args.data is None):
        raise ValueError("prepare needs exactly one of --pmc_csv (with --image_dir) or --data")
    if args.pmc_csv:
        source = read_pmc_csv(args.pmc_csv)
        base_dir = args.image_dir or os.path.dirname(os.path.abspath(args.pmc_csv))
        inputs = {"pmc_csv": runtime.file_fingerprint(args.pmc_csv, "--pmc_csv"), "image_dir": os.path.abspath(base_dir)}
    else:
        # prepare's job is to convert, so it asks only for the mapped columns; runtime.load_split
        # still refuses an empty set, or a set without them, naming the data.
        wanted = (args.question_column, args.options_column, args.answer_column)
        source = runtime.load_split(args.data, args.split, columns=wanted)
        if not args.dataset_name and "dataset_name" not in source.column_names:
            raise ValueError(f"{args.data} has no dataset_name column: give --dataset_name")
        base_dir = args.image_dir or runtime.data_dir(args.data)
        inputs = {"data": runtime.data_fingerprint(source), "image_dir": os.path.abspath(base_dir)}

    with claimed("prepare", args, inputs) as finished:
        if finished:
            return
        text_features = schema_features().copy()
        del text_features["images"], text_features["reasoning"]
        text_features.update(_drop=datasets.Value("string"), _bad=datasets.Value("string"))
        if args.pmc_csv:
            text = source.map(pmc_to_schema, batched=True, with_indices=True,
                              remove_columns=list(PMC_COLUMNS), keep_in_memory=True,
                              features=datasets.Features({"images": datasets.Value("string"),
                                                          **text_features}),
                              fn_kwargs=dict(dataset_name=args.dataset_name or "PMC-VQA"),
                              desc="PMC-VQA conversion")
            source, text = text.select_columns(["images"]), text.remove_columns("images")
            image_column = "images"
        else:
            columns = dict(question=args.question_column, options=args.options_column,
                           answer=args.answer_column, answer_text=args.answer_text_column)
            image_column = args.image_column if args.image_column in source.column_names else None
            read = [c for c in {*columns.values(), "dataset_name", "dataset_index"}
                    if c in source.column_names and c != image_column]
            text = source.select_columns(read).map(
                to_schema, batched=True, with_indices=True, remove_columns=read, keep_in_memory=True,
                features=text_features, fn_kwargs=dict(columns=columns, dataset_name=args.dataset_name),
                desc="conversion")
        images = run_image_pass(text, source, image_column, args, base_dir)

        drops, bads = column(text, "_drop"), column(images, "_bad")
        names, indices = column(text, "dataset_name"), column(text, "dataset_index")
        seen = set()  # a repeated key is a bad row, as in reward.check_rows: it joins predictions
        for row, key in enumerate(zip(names, indices)):
            if drops[row] is None and bads[row] is None:
                if key in seen:
                    bads[row] = (f"{reward.row_name(dict(dataset_name=key[0], dataset_index=key[1]))}"
                                 f": occurs twice; (dataset_name, dataset_index) must be unique")
                seen.add(key)
        bad = [{"position": row, "dataset_name": names[row], "dataset_index": indices[row],
                "reason": reason} for row, reason in enumerate(bads) if reason is not None]
        refuse_or_list(bad, len(text), args.on_bad_row, args.output_dir)

        parts = [images.select_columns(["images"]), text.remove_columns(["_drop", "_bad"])]
        if not args.pmc_csv:
            consumed = {image_column, "images", *read, *text.column_names}
            if "reasoning" in source.column_names:  # a schema set's traces stay (section 2)
                parts.append(source.select_columns(["reasoning"]))
            rest = [c for c in source.column_names if c not in consumed and c != "reasoning"]
            if rest:  # the source's other columns, carried through untouched
                parts.append(source.select_columns(rest))
        full = datasets.concatenate_datasets(parts, axis=1)
        if "reasoning" not in full.column_names:
            full = full.add_column("reasoning", [None] * len(full),
                                   feature=datasets.Value("string"))
        order = list(schema_features()) + [c for c in full.column_names if c not in schema_features()]
        keep = [row for row in range(len(full)) if drops[row] is None and bads[row] is None]
        kept = full.select_columns(order).select(keep, keep_in_memory=True)
        resized = collections.Counter(r for r in column(images, "_resized") if r)
        reasons = [drops[row] or (BAD_ROW if bads[row] else None) for row in range(len(full))]
        dropped, examples = count_drops(reasons)
        stats = dict(command="prepare", args=asdict(args), rows_in=len(full), kept=len(kept),
                     dropped=dropped, examples=examples,
                     images_resized={"short side up": resized["up"], "long side down": resized["down"]},
                     text_only=image_column is None)
        finish(kept, args.output_dir, stats,
               [f"  images resized: {resized['up']} short side up, {resized['down']} long side down"
                + ("" if image_column else " (no image column: text-only)")])
        shutil.rmtree(os.path.join(args.output_dir, IMAGE_CACHE), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# filter and traces: join a predictions file to the rows it was sampled on.
# ---------------------------------------------------------------------------------------------


def row_keys(data) -> tuple[dict, list, list]:
    """{(dataset_name, dataset_index): [rows]} with each row's (answer_label, answer), text only.
    A repeated key (a bad row) lists every row that has it: they all get that key's samples."""
    cols = data.select_columns(["dataset_name", "dataset_index", "answer_label", "answer"]).to_dict()
    keys = collections.defaultdict(list)
    for row, key in enumerate(zip(cols["dataset_name"], cols["dataset_index"])):
        keys[key].append(row)
    return dict(keys), cols["answer_label"], cols["answer"]


def sample_texts(record: dict, where: str) -> list[str]:
    """The K sampled completions of one line: evaluate.py's `responses`, or the official
    eval_results.jsonl's `parsed_outputs[*].output_text` (run_offline_inference.py)."""
    if "responses" in record:
        samples = record["responses"]
    elif isinstance(record.get("parsed_outputs"), list):
        samples = [o.get("output_text") if isinstance(o, dict) else None for o in record["parsed_outputs"]]
    else:
        raise ValueError(f"{where}: no `responses` (nor the official `parsed_outputs`)")
    if not isinstance(samples, list) or not samples or not all(isinstance(s, str) for s in samples):
        raise ValueError(f"{where}: the samples must be a non-empty list of strings")
    return samples


def read_predictions(path: str, keys: dict, labels: list, answers: list, summarise):
    """{row: what the line says about it} for every prediction line with a row: `summarise(record,
    where)` gives (a function of the row's answer_label and answer, the line's sample count).

    Read line by line, as UTF-8, split on "\\n" only: a line written by json.dumps(...,
    ensure_ascii=False) may hold U+2028, U+2029 or U+0085 inside a response, which
    str.splitlines() would take for line ends (and a 177k x 16 file is gigabytes: it is streamed).
    Errors name the line: not JSON, no key, a key twice (the official join kept the last line
    silently; here it is an error), a sample count other than the first line's, or an
    answer_label other than the data's (a predictions file of another set). Returns also the
    sample count K and the number of lines whose key matches no row.
    """
    found, first_line, unmatched, k, k_line = {}, {}, 0, None, None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(tqdm(f, desc=f"reading {path}", unit=" lines"), 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
                key = (record["dataset_name"], int(record["dataset_index"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{where}: not a prediction line with dataset_name and "
                                 f"dataset_index ({err!r})") from None
            if key in first_line:
                raise ValueError(f"{where}: a second prediction for dataset_name={key[0]!r} "
                                 f"dataset_index={key[1]} (the first is line {first_line[key]})")
            first_line[key] = line_no
            summary, count = summarise(record, where)
            if k is None:
                k, k_line = count, line_no
            elif count != k:
                raise ValueError(f"{where}: {count} samples, line {k_line} has {k}")
            rows = keys.get(key)
            if rows is None:
                unmatched += 1
                continue
            label = labels[rows[0]]
            if record.get("answer_label", label) != label:
                raise ValueError(f"{where}: answer_label {record['answer_label']!r} differs from the "
                                 f"data's {label!r} for dataset_name={key[0]!r} "
                                 f"dataset_index={key[1]}: predictions of another set?")
            for row in rows:
                found[row] = summary(labels[row], answers[row])
    if k is None:
        raise ValueError(f"{path}: no prediction lines")
    return found, k, unmatched


def pass_counter(pass_from: str):
    """summarise(record, where) -> (label, answer -> pass count, K) for read_predictions.

    inference (default): reward.pass_correct, the grade of eval/run_offline_inference.py, which
    wrote the official pass counts (`num_correct`); reward: reward.reward == 1 (training reward);
    correct: the file's own 0/1 `correct` list (evaluate.py's evaluation grade).
    """
    grades = {"inference": reward.pass_correct,
              "reward": lambda s, label, answer: reward.reward(s, label, answer) == 1.0}
    if pass_from in grades:
        grade = grades[pass_from]

        def summarise(record, where):
            samples = sample_texts(record, where)
            return (lambda label, answer: sum(grade(s, label, answer) for s in samples)), len(samples)
    elif pass_from == "correct":
        def summarise(record, where):
            correct = record.get("correct")
            if not isinstance(correct, list) or not correct or not all(c in (0, 1) for c in correct):
                raise ValueError(f"{where}: `correct` must be a non-empty list of 0/1, got {correct!r}")
            return (lambda label, answer: int(sum(correct))), len(correct)
    else:
        raise ValueError(f"--pass_from must be inference, reward or correct, got {pass_from!r}")
    return summarise


def official_order(counts: list[int], rows: list[int], shuffle: bool, seed: int, order: str) -> list[int]:
    """`rows` in the order order_easy_to_hard.py gives them: Dataset.shuffle(seed), then
    Dataset.sort("pass_count", reverse=True).

    datasets' shuffle selects numpy.random.default_rng(seed).permutation(n); its sort selects
    pyarrow.compute.sort_indices, a stable sort, so equal pass counts keep their shuffled order.
    We compute the same positions (Python's sort is stable too) and select once at the end.
    """
    if order not in ("easy_to_hard", "hard_to_easy", "none"):
        raise ValueError(f"--order must be easy_to_hard, hard_to_easy or none, got {order!r}")
    if shuffle:
        rows = [rows[j] for j in np.random.default_rng(seed).permutation(len(rows))]
    if order == "none":
        return rows
    return sorted(rows, key=lambda r: counts[r], reverse=order == "easy_to_hard")


def histogram(counts: dict, lo: int, hi: int, width: int = 40) -> list[str]:
    """Text bars of rows per pass count, the kept band marked."""
    top = max(counts.values(), default=0) or 1
    return [f"  {c:>3} | {'#' * round(width * n / top):<{width}} {n:>7}{'  kept' if lo <= c <= hi else ''}"
            for c, n in counts.items()]


def filter_by_pass_count(args: FilterArgs) -> None:
    """Keep the questions of moderate difficulty (docs/method.md section 7), as the official
    assign_pass_count.py + order_easy_to_hard.py do.

    1. pass_count = how many of the K samples the official inference grade marks correct
       (reward.pass_correct; --pass_from for the other grades); a row with no prediction line
       gets -1, as there;
    2. keep min_pass <= pass_count <= max_pass (the paper: 1..7 of 16; -1 is outside);
    3. shuffle with `seed`, then highest pass_count first, ties in shuffled order (official_order).
    Bad rows take part in steps 1-3 and leave last, so the others keep the official order exactly.
    Deviation: the official join keyed on dataset_index alone, ours on (dataset_name,
    dataset_index); they agree whenever dataset_index alone is unique in the set.
    """
    if args.min_pass > args.max_pass:
        raise ValueError(f"--min_pass {args.min_pass} is above --max_pass {args.max_pass}: no pass count "
                         "would be kept")
    data = runtime.load_split(args.data, args.split)
    inputs = {"data": runtime.data_fingerprint(data)}
    if args.predictions:
        inputs["predictions"] = runtime.file_fingerprint(args.predictions, "--predictions")
    with claimed("filter", args, inputs) as finished:
        if finished:
            return
        good, bad = checked(data, args, args.data)
        stats = dict(command="filter", args=asdict(args), rows_in=len(data))
        if args.predictions:
            keys, labels, answers = row_keys(data)
            found, k, unmatched = read_predictions(args.predictions, keys, labels, answers,
                                                   pass_counter(args.pass_from))
            counts = [found.get(row, -1) for row in range(len(data))]
            if "pass_count" in data.column_names:
                data = data.remove_columns("pass_count")  # replaced by the counts of this file
            data = data.add_column("pass_count", counts)
            stats.update(samples_per_row=k, predictions_without_row=unmatched)
        elif "pass_count" in data.column_names:
            counts = [-1 if c is None else c for c in column(data, "pass_count")]
            k = max(counts, default=0)
        else:
            raise ValueError(f"{args.data} has no pass_count column: give --predictions")

        band = [row for row, c in enumerate(counts) if args.min_pass <= c <= args.max_pass]
        is_good = np.zeros(len(data), bool)
        is_good[good] = True
        ordered = [row for row in official_order(counts, band, args.shuffle, args.seed, args.order)
                   if is_good[row]]
        kept = data.select(ordered, keep_in_memory=True)
        if args.on_bad_row == "skip":
            runtime.write_bad_rows(bad, args.output_dir)
        drops = [BAD_ROW if not is_good[row] else None if args.min_pass <= c <= args.max_pass
                 else "no prediction" if c == -1 else f"pass_count < {args.min_pass}"
                 if c < args.min_pass else f"pass_count > {args.max_pass}" for row, c in enumerate(counts)]
        hist = collections.Counter(c for c in counts if c >= 0)
        hist = {c: hist.get(c, 0) for c in range(k + 1)}
        dropped, examples = count_drops(drops)
        stats.update(kept=len(kept), dropped=dropped, examples=examples, histogram=hist)
        lines = [f"pass_count histogram ({sum(hist.values())} rows with a prediction, K = {k}):"]
        lines += histogram(hist, args.min_pass, args.max_pass)
        if stats.get("predictions_without_row"):
            lines.append(f"  {stats['predictions_without_row']} prediction lines match no row of {args.data}")
        if not len(kept):  # an empty set must not look like a success (GRPO would find no row)
            print("\n".join(lines))
            raise ValueError(f"{args.data}: no good row has a pass count in [{args.min_pass}, {args.max_pass}] "
                             f"(the histogram above): the filtered set would be empty")
        finish(kept, args.output_dir, stats, lines)


def first_correct(record, where):
    """summarise(record, where) for read_predictions: (label, answer -> (sample number, its think
    text) of the FIRST sample that reward.pass_correct marks correct, or (None, None)), K.

    As merge_pmc_vqa_cot.py: only the first correct sample counts; its think text is
    reward.think_text (the first <think> block, stripped), None when it has none. A later correct
    sample with a think block is not looked at.
    """
    samples = sample_texts(record, where)

    def pick(label, answer):
        for number, sample in enumerate(samples):
            if reward.pass_correct(sample, label, answer):
                return number, reward.think_text(sample)
        return None, None
    return pick, len(samples)


def traces(args: TracesArgs) -> None:
    """Rejection-sampled SFT traces (docs/method.md section 7: k = 3 teacher samples at T 1.0).

    `reasoning` becomes the think text of the first correct sample (first_correct). Dropped and
    counted: rows with no prediction, with no correct sample, or whose first correct sample has no
    think block. Kept as the official code keeps it: an empty think block gives reasoning ""
    (counted in the stats). Row order is kept.
    """
    data = runtime.load_split(args.data, args.split)
    inputs = {"data": runtime.data_fingerprint(data), "predictions": runtime.file_fingerprint(args.predictions, "--predictions")}
    with claimed("traces", args, inputs) as finished:
        if finished:
            return
        good, bad = checked(data, args, args.data)
        keys, labels, answers = row_keys(data)
        found, k, unmatched = read_predictions(args.predictions, keys, labels, answers, first_correct)
        is_good = set(good)
        picked = [found.get(row, (None, None)) for row in range(len(data))]
        drops = [BAD_ROW if row not in is_good else "no prediction" if row not in found
                 else "no correct sample" if number is None
                 else "first correct sample has no think block" if think is None else None
                 for row, (number, think) in enumerate(picked)]
        reasoning = [think if drop is None else None for (_, think), drop in zip(picked, drops)]
        if "reasoning" in data.column_names:
            data = data.remove_columns("reasoning")
        data = data.add_column("reasoning", reasoning, feature=datasets.Value("string"))
        kept = data.select([row for row, drop in enumerate(drops) if drop is None], keep_in_memory=True)
        if args.on_bad_row == "skip":
            runtime.write_bad_rows(bad, args.output_dir)
        which = collections.Counter(number for (number, _), drop in zip(picked, drops) if drop is None)
        dropped, examples = count_drops(drops)
        empty = sum(1 for text, drop in zip(reasoning, drops) if drop is None and text == "")
        stats = dict(command="traces", args=asdict(args), rows_in=len(data), kept=len(kept),
                     dropped=dropped, examples=examples, samples_per_row=k,
                     first_correct_sample={n: which.get(n, 0) for n in range(k)},
                     kept_with_empty_think=empty, predictions_without_row=unmatched)
        lines = [f"  first correct sample (0 = the first of {k}): {stats['first_correct_sample']}"]
        if empty:
            lines.append(f"  {empty} kept rows have an empty think block (reasoning \"\"), as officially")
        if unmatched:
            lines.append(f"  {unmatched} prediction lines match no row of {args.data}")
        finish(kept, args.output_dir, stats, lines)


# ---------------------------------------------------------------------------------------------
# split and mix: what the recipes need besides, so that each stays one command.
# ---------------------------------------------------------------------------------------------


def split(args: SplitArgs) -> None:
    """Hold out `n` rows with `Dataset.train_test_split(test_size=n, seed=seed)`.

    With p = numpy.random.default_rng(seed).permutation(len(data)) (after skipped bad rows leave),
    the held-out part is the rows p[:n] and the rest p[n:], in those orders. One DatasetDict folder.
    """
    data = runtime.load_split(args.data, args.split)
    with claimed("split", args, {"data": runtime.data_fingerprint(data)}) as finished:
        if finished:
            return
        good, bad = checked(data, args, args.data)
        rows_in = len(data)
        if bad:
            data = data.select(good, keep_in_memory=True)
        if not 0 < args.n < len(data):
            raise ValueError(f"--n {args.n} must be between 1 and {len(data) - 1}: "
                             f"{args.data} has {len(data)} good rows")
        if args.on_bad_row == "skip":
            runtime.write_bad_rows(bad, args.output_dir)
        # What Dataset.train_test_split(test_size=n, seed=seed) selects, selected in memory: the
        # library call writes two index files, next to the input's files unless given other names,
        # and refuses keep_in_memory (datasets 5.2).
        permutation = np.random.default_rng(args.seed).permutation(len(data))
        result = datasets.DatasetDict({
            args.rest_name: data.select(permutation[args.n:], keep_in_memory=True),
            args.held_out_name: data.select(permutation[: args.n], keep_in_memory=True)})
        per_name = {name: dict(collections.Counter(column(part, "dataset_name")))
                    for name, part in result.items()}
        stats = dict(command="split", args=asdict(args), rows_in=rows_in, kept=len(data),
                     dropped={BAD_ROW: len(bad)} if bad else {},
                     examples={BAD_ROW: [b["position"] for b in bad[:EXAMPLES_PER_REASON]]} if bad else {},
                     sizes={k: len(v) for k, v in result.items()}, dataset_names=per_name)
        finish(result, args.output_dir, stats, [f"  {name}: {len(part)} rows {per_name[name]}"
                                                for name, part in result.items()])


def mix(args: MixArgs) -> None:
    """Concatenate schema sets (in the order given; --shuffle to interleave them).

    Each set is checked on its own (its relative image paths resolve against its own folder); a
    skipped bad row is listed with its set. A set without `images` or `reasoning` gets None.
    Schema columns are cast to the types of docs/method.md section 2; extra columns survive only
    where every set has them (the others are named in the summary). A (dataset_name,
    dataset_index) found in two sets is an error: the key must stay unique.
    """
    if len(args.split) not in (1, len(args.data)):
        raise ValueError(f"--split takes one split or one per --data ({len(args.data)})")
    splits = args.split * len(args.data) if len(args.split) == 1 else args.split
    loaded = [runtime.load_split(path, name) for path, name in zip(args.data, splits)]
    with claimed("mix", args, {"data": [runtime.data_fingerprint(d) for d in loaded]}) as finished:
        if finished:
            return
        target = schema_features()
        sets, all_bad = [], []
        for path, data in zip(args.data, loaded):
            good, bad = checked(data, args, path)
            all_bad += [dict(b, data=path) for b in bad]
            if bad:
                data = data.select(good, keep_in_memory=True)
            for absent in ("images", "reasoning"):
                if absent not in data.column_names:
                    data = data.add_column(absent, [None] * len(data), feature=target[absent])
            sets.append(data)
        extras = [c for c in sets[0].column_names
                  if c not in target and all(c in d.column_names for d in sets)]
        left_out = sorted({c for d in sets for c in d.column_names if c not in target and c not in extras})
        features = datasets.Features({**target, **{c: sets[0].features[c] for c in extras}})
        owner = {}
        for i, data in enumerate(sets):
            for key in zip(column(data, "dataset_name"), column(data, "dataset_index")):
                if owner.setdefault(key, i) != i:
                    raise ValueError(f"dataset_name={key[0]!r} dataset_index={key[1]!r} is in both "
                                     f"{args.data[owner[key]]} and {args.data[i]}")
            data = data.select_columns(list(features))
            wrong = [c for c in features if data.features[c] != features[c]]
            if wrong:  # cast only those columns, so that the image bytes are not rewritten
                fixed = data.select_columns(wrong).cast(
                    datasets.Features({c: features[c] for c in wrong}), keep_in_memory=True)
                data = datasets.concatenate_datasets([data.remove_columns(wrong), fixed], axis=1)
            sets[i] = data.select_columns(list(features))
        mixed = datasets.concatenate_datasets(sets)
        if args.shuffle:
            mixed = mixed.shuffle(seed=args.seed, keep_in_memory=True)
        if args.on_bad_row == "skip":
            runtime.write_bad_rows(all_bad, args.output_dir)
        stats = dict(command="mix", args=asdict(args), rows_in=sum(len(d) for d in loaded),
                     kept=len(mixed), dropped={BAD_ROW: len(all_bad)} if all_bad else {},
                     examples={}, rows_per_set=[len(d) for d in sets], columns_left_out=left_out,
                     dataset_names=dict(collections.Counter(column(mixed, "dataset_name"))))
        lines = [f"  {path}: {len(d)} rows" for path, d in zip(args.data, sets)]
        if left_out:
            lines.append(f"  columns not in every set, left out: {left_out}")
        finish(mixed, args.output_dir, stats, lines)


COMMANDS = {
    "prepare": (PrepareArgs, prepare),
    "filter": (FilterArgs, filter_by_pass_count),
    "traces": (TracesArgs, traces),
    "split": (SplitArgs, split),
    "mix": (MixArgs, mix),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python curate.py {'|'.join(COMMANDS)} [settings.yaml] [--help | options]"
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__.strip()}\n\nEach command's flags and defaults: python curate.py COMMAND --help")
        return
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(usage if not argv else f"unknown command {argv[0]!r}{runtime.closest(argv[0], COMMANDS)}; {usage}")
    args_class, command = COMMANDS[argv[0]]
    command(runtime.parse_args(args_class, argv=argv[1:]))  # a YAML/JSON file first, flags override it


if __name__ == "__main__":
    runtime.run_main(main)
