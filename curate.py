"""Data curation: normalise sources to the schema, filter by difficulty, distil reasoning traces.

MedVLThinker (arXiv 2508.02669; DESIGN.md sections 2 and 7) trains on
medical multiple-choice questions that all share one schema, keeps only the questions the base
model solves sometimes but not often, and distils SFT traces by rejection sampling. One subcommand
per step, each reading schema datasets (anything `reward.load_split` accepts, with --split) and
writing one `Dataset.save_to_disk` folder (`split` writes a DatasetDict) with OUT/curate_stats.json
(rows in, kept, dropped per reason) next to the data:

    prepare  PMC-VQA's raw CSV + figures, a set already in the schema, or another MCQ set (a column
             mapping) -> validated schema rows; bad rows dropped and counted per reason; images
             resized so that no side is under 28 px or over 1024 px.
    filter   join pass counts from an evaluate.py predictions file (16 samples at T 1.0 of the
             base model), keep 1 <= pass_count <= 7, shuffle with seed 42.
    traces   from a teacher's predictions file (k samples), the think text of the first correct
             sample becomes `reasoning`; questions with none are dropped.
    split    hold out a validation slice (the paper validated on 400 items of the eval set).
    mix      concatenate sets that share the schema (e.g. m23k + PMC-VQA).

    python curate.py prepare --pmc_csv PMC-VQA/train.csv --image_dir PMC-VQA/figures --out data/pmc
    python curate.py filter --data data/pmc --predictions runs/pass16/predictions.jsonl --out data/pmc_1to7
    python curate.py traces --data data/pmc --predictions runs/teacher/predictions.jsonl --out data/pmc_sft

Only `prepare` decodes images (to prove they decode and to resize them); every other step reads
the text columns alone and copies the image bytes untouched.
"""

import collections
import io
import json
import os
import shutil
import string
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import datasets
import pandas as pd
from PIL import Image

import reward

STATS_FILE = "curate_stats.json"
# The official PMC-VQA conversion strips these from both ends of every cell: whitespace, quotes,
# the no-break space and the hair space. We strip the same characters, so we drop the same rows.
STRIP = string.whitespace + "'\"\xa0\u200a"
PMC_COLUMNS = ("Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer_label")
EXAMPLES_PER_REASON = 20  # row numbers kept in the stats file for each drop reason


def schema_features():
    """The column types of DESIGN.md section 2, shared by every output so that sets can be mixed."""
    text = datasets.Value("string")
    return datasets.Features({
        "images": datasets.List(datasets.Image()), "question": text, "options": text,
        "answer_label": text, "answer": text, "reasoning": text, "dataset_name": text,
        "dataset_index": datasets.Value("int64"),
    })


# ---------------------------------------------------------------------------------------------
# Arguments: one dataclass per subcommand; the defaults are the paper's settings.
# ---------------------------------------------------------------------------------------------


@dataclass
class PrepareArgs:
    out: str = field(metadata={"help": "Output folder (save_to_disk) with curate_stats.json."})
    pmc_csv: str | None = field(default=None, metadata={
        "help": "PMC-VQA's raw CSV (Figure_path, Question, Answer, Choice A-D, Answer_label)."})
    image_dir: str | None = field(default=None, metadata={
        "help": "Folder that image paths are relative to (PMC-VQA's figures)."})
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
    min_side: int = field(default=28, metadata={"help": "Shorter sides are scaled up to this (px)."})
    max_side: int = field(default=1024, metadata={"help": "Longer sides are scaled down to this (px)."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for the image pass."})


@dataclass
class FilterArgs:
    data: str = field(metadata={"help": "The schema set the pass counts were sampled on."})
    out: str = field(metadata={"help": "Output folder (save_to_disk) with curate_stats.json."})
    predictions: str | None = field(default=None, metadata={
        "help": "evaluate.py's predictions.jsonl (K samples a row). Without it, the data's own "
                "pass_count column is used."})
    split: str = "train"
    min_pass: int = 1
    max_pass: int = 7
    pass_from: str = field(default="reward", metadata={
        "help": "reward: count reward.reward(response) == 1 (the paper's training reward, format "
                "included); correct: sum the file's `correct` list (evaluate.py's grading)."})
    shuffle: bool = True
    seed: int = 42


@dataclass
class TracesArgs:
    data: str = field(metadata={"help": "The schema set the teacher answered."})
    predictions: str = field(metadata={"help": "The teacher's predictions.jsonl (k samples a row)."})
    out: str = field(metadata={"help": "Output folder (save_to_disk) with curate_stats.json."})
    split: str = "train"


@dataclass
class SplitArgs:
    data: str = field(metadata={"help": "The set to split (e.g. the eval set)."})
    out: str = field(metadata={"help": "Output folder: a DatasetDict with both parts."})
    split: str = "train"
    n: int = field(default=400, metadata={
        "help": "Rows held out (the paper validated on 400 eval items; which ones is not published)."})
    seed: int = 42
    held_out_name: str = "validation"
    rest_name: str = "train"


@dataclass
class MixArgs:
    data: list[str] = field(metadata={"help": "Two or more schema sets."})
    out: str = field(metadata={"help": "Output folder (save_to_disk) with curate_stats.json."})
    split: list[str] = field(default_factory=lambda: ["train"], metadata={
        "help": "One split for every set, or one per set."})
    shuffle: bool = False
    seed: int = 42


# ---------------------------------------------------------------------------------------------
# Shared plumbing: counting drops, saving the data and its stats.
# ---------------------------------------------------------------------------------------------


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
    """Save the data, then its stats; print the summary (kept / dropped per reason)."""
    data.save_to_disk(out)
    with open(os.path.join(out, STATS_FILE), "w") as f:
        json.dump(stats, f, indent=1)
    print(f"{stats['command']}: kept {stats['kept']} of {stats['rows_in']} rows -> {out}")
    for reason, n in sorted(stats.get("dropped", {}).items(), key=lambda item: -item[1]):
        print(f"  dropped {n:>7}  {reason}  (first rows: {stats['examples'].get(reason, [])[:5]})")
    for line in lines:
        print(line)
    print(f"stats: {os.path.join(out, STATS_FILE)}")


# ---------------------------------------------------------------------------------------------
# prepare, step 1 (PMC-VQA only): the raw CSV's four choice columns -> one options object.
# ---------------------------------------------------------------------------------------------


def read_pmc_csv(path: str):
    """PMC-VQA's CSV as a Dataset of strings; an empty cell stays "" (the official reader's
    `dtype=str, keep_default_na=False`), so "NA" as an answer is not lost to a NaN."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in PMC_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; PMC-VQA's CSV has {list(PMC_COLUMNS)}")
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def parse_pmc_choice(cell: str, letter: str) -> str | None:
    """`" B:Focal uptake "` -> `"Focal uptake"` when the cell names its own column's letter."""
    head, colon, text = cell.strip(STRIP).partition(":")
    if not colon or head.strip(STRIP) != letter:
        return None
    return text.strip(STRIP)


def pmc_to_schema(batch: dict) -> dict:
    """Schema columns from PMC-VQA's CSV columns (batched map), as the official conversion does.

    Rows are dropped, as there, when a choice is not `letter: text` under its own letter, or the
    label is not one of A-D. The answer text is checked against the label's option in the common
    step below (`to_schema`). The image stays a path until the image pass.
    """
    out = {k: [] for k in ("images", "question", "options", "answer_label", "answer", "_drop")}
    for i, path in enumerate(batch["Figure_path"]):
        options = {letter: parse_pmc_choice(batch[f"Choice {letter}"][i], letter) for letter in "ABCD"}
        label = batch["Answer_label"][i].strip(STRIP)
        drop = None
        if any(text is None for text in options.values()):
            drop = "bad choice format"
        elif label not in options:
            drop = "answer_label not among A-D"
        out["images"].append(path)
        out["question"].append(batch["Question"][i].strip(STRIP))
        out["options"].append(json.dumps(options, ensure_ascii=False))
        out["answer_label"].append(label)
        out["answer"].append(batch["Answer"][i].strip(STRIP))
        out["_drop"].append(drop)
    return out


# ---------------------------------------------------------------------------------------------
# prepare, step 2 (every source): text columns -> validated schema columns, drops per reason.
# ---------------------------------------------------------------------------------------------


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
    """(letter, None) for an answer cell that is an option letter or exactly one option's text."""
    if not isinstance(cell, str):
        return None, "answer not among the options"
    cell = cell.strip(STRIP)
    if cell in options:
        return cell, None
    letters = [letter for letter, text in options.items() if text.strip(STRIP) == cell]
    if len(letters) == 1:
        return letters[0], None
    return None, "answer matches several options" if letters else "answer not among the options"


def to_schema(batch: dict, rows: list[int], columns: dict, dataset_name: str | None) -> dict:
    """Validated schema text columns (batched map); `_drop` holds the reason a row is left out.

    Checks, first failure wins: a non-empty question; options letter -> text; the answer among
    them; the answer text (where the data has one) equal to the label's option text, compared
    stripped as the official PMC-VQA code does; a dataset_name and an integer dataset_index
    (the row number when the data has no dataset_index column). `answer` becomes the option text.
    The official code checked only the options and the answer; the other checks (and the
    duplicate keys and undecodable images below) are ours, each counted under its own reason.
    """
    n = len(rows)
    prior = batch.get("_drop", [None] * n)
    names = [dataset_name] * n if dataset_name else batch.get("dataset_name", [None] * n)
    indices = batch["dataset_index"] if "dataset_index" in batch else rows
    out = {k: [] for k in ("question", "options", "answer_label", "answer", "dataset_name",
                           "dataset_index", "_drop")}
    for i in range(n):
        question, options = batch[columns["question"]][i], None
        label, drop = None, prior[i]
        if drop is None and not (isinstance(question, str) and question.strip()):
            drop = "empty question"
        if drop is None and (options := parse_options_cell(batch[columns["options"]][i])) is None:
            drop = "bad options (not letter -> text)"
        if drop is None:
            label, drop = resolve_label(batch[columns["answer"]][i], options)
        if drop is None and columns["answer_text"] in batch:
            text = batch[columns["answer_text"]][i]
            if not isinstance(text, str) or text.strip(STRIP) != options[label].strip(STRIP):
                drop = "answer text differs from the label's option"
        if drop is None and not (isinstance(names[i], str) and names[i]):
            drop = "missing dataset_name"
        index = indices[i]
        if drop is None and (not isinstance(index, int) or isinstance(index, bool)):
            drop = "missing dataset_index"
        keep = drop is None
        out["question"].append(question if keep else None)
        out["options"].append(json.dumps(options, ensure_ascii=False) if keep else None)
        out["answer_label"].append(label if keep else None)
        out["answer"].append(options[label] if keep else None)
        out["dataset_name"].append(names[i] if keep else None)
        out["dataset_index"].append(index if keep else None)
        out["_drop"].append(drop)
    return out


def mark_duplicates(names: list, indices: list, drops: list) -> list:
    """Later rows repeating a (dataset_name, dataset_index) are dropped: the key joins pass counts
    and traces to rows, so it must be unique."""
    seen, drops = set(), list(drops)
    for row, key in enumerate(zip(names, indices)):
        if drops[row] is None:
            if key in seen:
                drops[row] = "duplicate dataset_name/dataset_index"
            seen.add(key)
    return drops


# ---------------------------------------------------------------------------------------------
# prepare, step 3: images proven to decode and resized for Qwen2.5-VL (DESIGN.md section 7).
# ---------------------------------------------------------------------------------------------


def qwen_size(width: int, height: int, min_side: int, max_side: int) -> tuple[int, int, list]:
    """Target size of the official `resize_image_to_qwen2_5_vl`, bilinear, aspect ratio kept:

    1. if a side is under `min_side`, the shorter side becomes min_side (the other scales with it);
    2. then, if a side is over `max_side`, the longer side becomes max_side.
    The scaled side is truncated with int(), as there. A very thin image (aspect ratio over
    1024 / 28) ends with a side under 28 again; the official code leaves it so, and Qwen2.5-VL's
    processor rounds sides up to 28 itself.
    """
    steps = []
    if min(width, height) < min_side:
        if width < height:
            width, height = min_side, int(height * (min_side / width))
        else:
            width, height = int(width * (min_side / height)), min_side
        steps.append("up")
    if max(width, height) > max_side:
        if width > height:
            width, height = max_side, max(1, int(height * (max_side / width)))
        else:
            width, height = max(1, int(width * (max_side / height))), max_side
        steps.append("down")
    return width, height, steps


def load_image(source, image_dir: str | None):
    """(bytes, path, decoded image) of one image cell item, or a drop reason (a str)."""
    data, path = (source.get("bytes"), source.get("path")) if isinstance(source, dict) else (None, source)
    if data is None:
        if not isinstance(path, str) or not path:
            return "missing image"
        full = os.path.join(image_dir, path) if image_dir else path
        if not os.path.isfile(full):
            return "missing image"
        with open(full, "rb") as f:
            data = f.read()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode every pixel: a truncated file fails here, not in a training step
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return "undecodable image"
    return data, path, image


def check_images(batch, image_column: str, image_dir: str | None, min_side: int, max_side: int) -> dict:
    """The image pass (batched map over the image column as Arrow, so nothing is decoded twice).

    An image already within bounds keeps its original bytes (no re-encoding); a resized one is
    stored as PNG, the format `datasets` gives a PIL image without one, as in the official run
    (compression level 1: the same pixels, encoded about 5x faster than PIL's default level 6).
    Rows already dropped are skipped; a None / empty cell is a text-only row.
    """
    cells, drops = batch.column(image_column).to_pylist(), batch.column("_drop").to_pylist()
    out = {"images": [], "_drop": [], "_up": [], "_down": []}
    for cell, drop in zip(cells, drops):
        images, steps = [], []
        sources = [] if drop is not None or cell is None else (
            [cell] if isinstance(cell, (str, dict)) else list(cell))
        for source in sources:
            loaded = load_image(source, image_dir)
            if isinstance(loaded, str):
                drop = loaded
                break
            data, path, image = loaded
            width, height, resized = qwen_size(*image.size, min_side, max_side)
            if resized:
                if image.mode not in ("L", "LA", "RGB", "RGBA"):
                    image = image.convert("RGB")
                buffer = io.BytesIO()
                image.resize((width, height), Image.BILINEAR).save(buffer, format="PNG", compress_level=1)
                data = buffer.getvalue()
            steps += resized
            images.append({"bytes": data, "path": path})
        keep = drop is None and images
        out["images"].append(images if keep else None)
        out["_drop"].append(drop)
        out["_up"].append(steps.count("up") if keep else 0)
        out["_down"].append(steps.count("down") if keep else 0)
    return out


def image_pass(source, image_column: str | None, drops: list, args: PrepareArgs, scratch: str):
    """Images, `_drop` (text drops passed through) and resize counts for every row.

    The pass is cached in `scratch` under a key of the inputs and flags, so a stopped run resumes
    (with --num_proc N, finished shards are reused).
    """
    features = datasets.Features({"images": schema_features()["images"],
                                  "_drop": datasets.Value("string"),
                                  "_up": datasets.Value("int64"), "_down": datasets.Value("int64")})
    if image_column is None:
        n = len(drops)
        return datasets.Dataset.from_dict(
            {"images": [None] * n, "_drop": drops, "_up": [0] * n, "_down": [0] * n}, features=features)
    view = source.select_columns([image_column]).add_column("_drop", drops)
    origin = ([os.path.abspath(args.pmc_csv), os.path.getmtime(args.pmc_csv)] if args.pmc_csv
              else source._fingerprint)
    settings = {k: v for k, v in asdict(args).items() if k not in ("out", "num_proc")}
    key = datasets.fingerprint.Hasher.hash([origin, settings, drops])
    os.makedirs(scratch, exist_ok=True)
    return view.with_format("arrow").map(
        check_images, batched=True, batch_size=64, writer_batch_size=64, features=features,
        remove_columns=view.column_names, num_proc=args.num_proc, desc="images",
        fn_kwargs=dict(image_column=image_column, image_dir=args.image_dir,
                       min_side=args.min_side, max_side=args.max_side),
        cache_file_name=os.path.join(scratch, f"images-{key}.arrow"),
    ).with_format(None)


def prepare(args: PrepareArgs) -> None:
    """Schema rows from one source: PMC-VQA's CSV, a schema set, or a mapped multiple-choice set.

    Output: the schema columns (a text-only row has images None; reasoning None where the source
    has none), then the source's other columns untouched. dataset_index is the source's own, else
    the row number (for PMC-VQA: the CSV's data row, 0-based; the official code numbered kept rows
    instead, a deviation that keeps every row traceable to its CSV line = row + 2).
    """
    if (args.pmc_csv is None) == (args.data is None):
        raise ValueError("prepare needs exactly one of --pmc_csv (with --image_dir) or --data")
    if args.pmc_csv:
        raw = read_pmc_csv(args.pmc_csv)
        source = raw.map(pmc_to_schema, batched=True, remove_columns=list(PMC_COLUMNS),
                         keep_in_memory=True, desc="PMC-VQA choices")
        columns = dict(question="question", options="options", answer="answer_label",
                       answer_text="answer", images="images")
        dataset_name = args.dataset_name or "PMC-VQA"
    else:
        source = reward.load_split(args.data, args.split)
        columns = dict(question=args.question_column, options=args.options_column,
                       answer=args.answer_column, answer_text=args.answer_text_column,
                       images=args.image_column)
        dataset_name = args.dataset_name
        missing = [c for c in (columns["question"], columns["options"], columns["answer"])
                   if c not in source.column_names]
        if missing:
            raise ValueError(f"{args.data}: no column(s) {missing}; it has {source.column_names}")
        if not dataset_name and "dataset_name" not in source.column_names:
            raise ValueError(f"{args.data} has no dataset_name column: give --dataset_name")
    image_column = columns["images"] if columns["images"] in source.column_names else None

    # Text first, without the images: the image pass then skips every row already dropped.
    read = [c for c in {*columns.values(), "dataset_name", "dataset_index", "_drop"}
            if c in source.column_names and c != image_column]
    text_features = schema_features().copy()
    del text_features["images"], text_features["reasoning"]
    text_features["_drop"] = datasets.Value("string")
    text = source.select_columns(read).map(
        to_schema, batched=True, with_indices=True, remove_columns=read, keep_in_memory=True,
        features=text_features, fn_kwargs=dict(columns=columns, dataset_name=dataset_name),
        desc="validate")
    drops = mark_duplicates(column(text, "dataset_name"), column(text, "dataset_index"),
                            column(text, "_drop"))

    scratch = os.path.abspath(args.out).rstrip("/") + ".tmp"
    images = image_pass(source, image_column, drops, args, scratch)
    drops = column(images, "_drop")
    consumed = set(read) | {image_column, *text.column_names, "images"}
    parts = [images, text.remove_columns("_drop")]
    if "reasoning" not in source.column_names:
        no_reasoning = datasets.Features({"reasoning": datasets.Value("string")})
        parts.append(datasets.Dataset.from_dict({"reasoning": [None] * len(source)}, features=no_reasoning))
    rest = [c for c in source.column_names if c not in consumed]
    if rest:  # the source's other columns, carried through untouched (DESIGN.md section 2)
        parts.append(source.select_columns(rest))
    full = datasets.concatenate_datasets(parts, axis=1)
    kept = full.filter(lambda d: [x is None for x in d], input_columns=["_drop"], batched=True,
                       keep_in_memory=True)
    up, down = sum(column(images, "_up")), sum(column(images, "_down"))
    kept = kept.remove_columns(["_drop", "_up", "_down"])
    dropped, examples = count_drops(drops)
    stats = dict(command="prepare", args=asdict(args), rows_in=len(source), kept=len(kept),
                 dropped=dropped, examples=examples,
                 images_resized={"short side up": up, "long side down": down},
                 text_only=image_column is None)
    finish(kept, args.out, stats, [f"  images resized: {up} short side up, {down} long side down"
                                   + ("" if image_column else " (no image column: text-only)")])
    shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# filter and traces: join an evaluate.py predictions file to the rows it was sampled on.
# ---------------------------------------------------------------------------------------------


def row_keys(data) -> tuple[dict, list, list]:
    """{(dataset_name, dataset_index): row} with each row's (answer_label, answer), text only."""
    cols = data.select_columns(["dataset_name", "dataset_index", "answer_label", "answer"]).to_dict()
    keys = {}
    for row, key in enumerate(zip(cols["dataset_name"], cols["dataset_index"])):
        if key in keys:
            raise ValueError(f"dataset_name={key[0]!r} dataset_index={key[1]!r} is in rows "
                             f"{keys[key]} and {row}: the join key must be unique")
        keys[key] = row
    return keys, cols["answer_label"], cols["answer"]


def read_predictions(path: str, keys: dict, labels: list, answers: list, field_name: str, summarise):
    """{row: summarise(samples, answer_label, answer)} for every prediction line with a row.

    Streamed line by line (a 177k x 16 file is gigabytes). Errors name the line: not JSON, no key,
    a key twice, a different sample count than the first line, or an answer_label different from
    the data's (a predictions file of another set). Returns also the sample count K and the number
    of lines whose key matches no row.
    """
    found, first_line, unmatched, k = {}, {}, 0, None
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
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
            samples = record.get(field_name)
            if not isinstance(samples, list) or not samples:
                raise ValueError(f"{where}: `{field_name}` must be a non-empty list")
            if k is None:
                k = len(samples)
            elif len(samples) != k:
                raise ValueError(f"{where}: {len(samples)} samples in `{field_name}`, line 1 has {k}")
            row = keys.get(key)
            if row is None:
                unmatched += 1
                continue
            if record.get("answer_label", labels[row]) != labels[row]:
                raise ValueError(f"{where}: answer_label {record['answer_label']!r} differs from the "
                                 f"data's {labels[row]!r} for dataset_name={key[0]!r} "
                                 f"dataset_index={key[1]}: predictions of another set?")
            found[row] = summarise(samples, labels[row], answers[row], where)
    if k is None:
        raise ValueError(f"{path}: no prediction lines")
    return found, k, unmatched


def pass_count_of(pass_from: str):
    """The per-row pass count: rewards equal to 1 (DESIGN.md section 7), or evaluate.py's grades."""
    def from_reward(responses, label, answer, where):
        if not all(isinstance(r, str) for r in responses):
            raise ValueError(f"{where}: `responses` must be strings")
        return sum(reward.reward(r, label, answer) == 1.0 for r in responses)

    def from_correct(correct, label, answer, where):
        if not all(c in (0, 1) for c in correct):
            raise ValueError(f"{where}: `correct` must hold 0/1 values, got {correct}")
        return int(sum(correct))

    if pass_from not in ("reward", "correct"):
        raise ValueError(f"--pass_from must be reward or correct, got {pass_from!r}")
    return ("responses", from_reward) if pass_from == "reward" else ("correct", from_correct)


def histogram(counts: dict, lo: int, hi: int, width: int = 40) -> list[str]:
    """Text bars of rows per pass count, the kept band marked."""
    top = max(counts.values(), default=0) or 1
    return [f"  {c:>3} | {'#' * round(width * n / top):<{width}} {n:>7}{'  kept' if lo <= c <= hi else ''}"
            for c, n in counts.items()]


def filter_by_pass_count(args: FilterArgs) -> None:
    """Keep the questions of moderate difficulty (DESIGN.md section 7).

    pass_count = how many of the K samples earn reward 1, recomputed from `responses` (evaluate.py's
    `correct` uses the lenient evaluation rule; --pass_from correct sums it instead). Keep
    min_pass <= pass_count <= max_pass (the paper: 1..7 of 16), then `Dataset.shuffle(seed)`: the
    kept rows, in their input order, are reordered by numpy.random.default_rng(seed).permutation.
    Rows without a prediction are reported and left out; prediction lines that match no row are
    counted.
    """
    data = reward.load_split(args.data, args.split)
    stats = dict(command="filter", args=asdict(args), rows_in=len(data))
    if args.predictions:
        keys, labels, answers = row_keys(data)
        field_name, summarise = pass_count_of(args.pass_from)
        found, k, unmatched = read_predictions(args.predictions, keys, labels, answers, field_name,
                                               summarise)
        counts = [found.get(row) for row in range(len(data))]
        if "pass_count" in data.column_names:
            data = data.remove_columns("pass_count")  # replaced by the counts of this file
        data = data.add_column("pass_count", counts)
        stats.update(samples_per_row=k, predictions_without_row=unmatched)
    elif "pass_count" in data.column_names:
        counts = column(data, "pass_count")
        k = max((c for c in counts if c is not None), default=0)
    else:
        raise ValueError(f"{args.data} has no pass_count column: give --predictions")

    drops = ["no prediction" if c is None else f"pass_count < {args.min_pass}" if c < args.min_pass
             else f"pass_count > {args.max_pass}" if c > args.max_pass else None for c in counts]
    hist = collections.Counter(c for c in counts if c is not None)
    hist = {c: hist.get(c, 0) for c in range(k + 1)}
    kept = data.filter(lambda p: [c is not None and args.min_pass <= c <= args.max_pass for c in p],
                       input_columns=["pass_count"], batched=True, keep_in_memory=True)
    if args.shuffle:
        kept = kept.shuffle(seed=args.seed, keep_in_memory=True)
    dropped, examples = count_drops(drops)
    stats.update(kept=len(kept), dropped=dropped, examples=examples, histogram=hist)
    lines = [f"pass_count histogram ({sum(hist.values())} rows with a prediction, K = {k}):"]
    lines += histogram(hist, args.min_pass, args.max_pass)
    if stats.get("predictions_without_row"):
        lines.append(f"  {stats['predictions_without_row']} prediction lines match no row of {args.data}")
    finish(kept, args.out, stats, lines)


def think_text(completion: str) -> str:
    """The text between <think> and the first </think>, stripped (the completion passed format_ok)."""
    return completion[len("<think>") : completion.index("</think>")].strip()


def first_correct(responses, label, answer, where):
    """(sample number, think text) of the first response with reward 1, or (None, None).

    Graded here with reward.reward (format included: a trace needs its think block), so a file
    with responses alone works, whatever grading wrote its `correct` list.
    """
    for number, response in enumerate(responses):
        if not isinstance(response, str):
            raise ValueError(f"{where}: `responses` must be strings")
        if reward.reward(response, label, answer) == 1.0:
            return number, think_text(response)
    return None, None


def traces(args: TracesArgs) -> None:
    """Rejection-sampled SFT traces (DESIGN.md section 7: k = 3 teacher samples at T 1.0).

    `reasoning` becomes the think text of the first correct sample; rows with no correct sample
    or with no prediction are dropped and counted. Row order is kept. A first correct sample whose
    think text is empty is dropped too (ours, not the paper's: an empty trace teaches nothing).
    """
    data = reward.load_split(args.data, args.split)
    keys, labels, answers = row_keys(data)
    found, k, unmatched = read_predictions(args.predictions, keys, labels, answers, "responses",
                                           first_correct)
    picked = [found.get(row, (None, None)) for row in range(len(data))]
    drops = ["no prediction" if row not in found else "no correct sample" if number is None
             else "empty think text" if not think else None
             for row, (number, think) in enumerate(picked)]
    reasoning = [think if drop is None else None for (_, think), drop in zip(picked, drops)]
    if "reasoning" in data.column_names:
        data = data.remove_columns("reasoning")
    data = data.add_column("reasoning", reasoning)
    kept = data.filter(lambda r: [x is not None for x in r], input_columns=["reasoning"],
                       batched=True, keep_in_memory=True)
    which = collections.Counter(number for (number, _), drop in zip(picked, drops) if drop is None)
    dropped, examples = count_drops(drops)
    stats = dict(command="traces", args=asdict(args), rows_in=len(data), kept=len(kept),
                 dropped=dropped, examples=examples, samples_per_row=k,
                 first_correct_sample={n: which.get(n, 0) for n in range(k)},
                 predictions_without_row=unmatched)
    lines = [f"  first correct sample (0 = the first of {k}): {stats['first_correct_sample']}"]
    if unmatched:
        lines.append(f"  {unmatched} prediction lines match no row of {args.data}")
    finish(kept, args.out, stats, lines)


# ---------------------------------------------------------------------------------------------
# split and mix: what the recipes need besides, so that each stays one command.
# ---------------------------------------------------------------------------------------------


def split(args: SplitArgs) -> None:
    """Hold out `n` rows with `Dataset.train_test_split(test_size=n, seed=seed)`.

    With p = numpy.random.default_rng(seed).permutation(len(data)), the held-out part is the rows
    p[:n] and the rest p[n:], in those orders. Written as one DatasetDict folder.
    """
    data = reward.load_split(args.data, args.split)
    if not 0 < args.n < len(data):
        raise ValueError(f"--n {args.n} must be between 1 and {len(data) - 1}: "
                         f"{args.data} has {len(data)} rows")
    # The two index files go to a scratch folder, not next to the input's own files (datasets 5.2
    # rejects keep_in_memory here when the input is a folder on disk).
    with tempfile.TemporaryDirectory() as scratch:
        parts = data.train_test_split(
            test_size=args.n, seed=args.seed,
            train_indices_cache_file_name=os.path.join(scratch, "rest.arrow"),
            test_indices_cache_file_name=os.path.join(scratch, "held_out.arrow"))
        result = datasets.DatasetDict({args.rest_name: parts["train"], args.held_out_name: parts["test"]})
        per_name = {name: dict(collections.Counter(column(part, "dataset_name")))
                    for name, part in result.items()}
        stats = dict(command="split", args=asdict(args), rows_in=len(data), kept=len(data),
                     dropped={}, examples={}, sizes={k: len(v) for k, v in result.items()},
                     dataset_names=per_name)
        finish(result, args.out, stats, [f"  {name}: {len(part)} rows {per_name[name]}"
                                         for name, part in result.items()])


def mix(args: MixArgs) -> None:
    """Concatenate schema sets (in the order given; --shuffle to interleave them).

    Every set needs the schema's text columns; a set without `images` or `reasoning` gets None.
    Schema columns are cast to the types of DESIGN.md section 2; extra columns survive only where
    every set has them (the others are named in the summary). A (dataset_name, dataset_index)
    found in two sets is an error: the key must stay unique.
    """
    if len(args.split) not in (1, len(args.data)):
        raise ValueError(f"--split takes one split or one per --data ({len(args.data)})")
    splits = args.split * len(args.data) if len(args.split) == 1 else args.split
    target = schema_features()
    sets = []
    for path, name in zip(args.data, splits):
        data = reward.load_split(path, name)
        missing = [c for c in target if c not in ("images", "reasoning") and c not in data.column_names]
        if missing:
            raise ValueError(f"{path} ({name}): no schema column(s) {missing}")
        for absent in ("images", "reasoning"):
            if absent not in data.column_names:
                data = data.add_column(absent, [None] * len(data))
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
            fixed = data.select_columns(wrong).cast(datasets.Features({c: features[c] for c in wrong}),
                                                    keep_in_memory=True)
            data = datasets.concatenate_datasets([data.remove_columns(wrong), fixed], axis=1)
        sets[i] = data.select_columns(list(features))
    mixed = datasets.concatenate_datasets(sets)
    if args.shuffle:
        mixed = mixed.shuffle(seed=args.seed, keep_in_memory=True)
    stats = dict(command="mix", args=asdict(args), rows_in=len(mixed), kept=len(mixed), dropped={},
                 examples={}, rows_per_set=[len(d) for d in sets], columns_left_out=left_out,
                 dataset_names=dict(collections.Counter(column(mixed, "dataset_name"))))
    lines = [f"  {path}: {len(d)} rows" for path, d in zip(args.data, sets)]
    if left_out:
        lines.append(f"  columns not in every set, left out: {left_out}")
    finish(mixed, args.out, stats, lines)


COMMANDS = {
    "prepare": (PrepareArgs, prepare),
    "filter": (FilterArgs, filter_by_pass_count),
    "traces": (TracesArgs, traces),
    "split": (SplitArgs, split),
    "mix": (MixArgs, mix),
}


def main(argv=None):
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python curate.py {'|'.join(COMMANDS)} [--help | options]")
    args_class, command = COMMANDS[argv[0]]
    (args,) = HfArgumentParser(args_class).parse_args_into_dataclasses(argv[1:])
    command(args)


if __name__ == "__main__":
    main()
