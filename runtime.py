"""The run's machinery, shared by every stage: settings, the run folder, checkpoints, precision and
FSDP, timing and MFU, the numerical guard. A reader of the paper never needs to open this file: the
method is in reward.py and the stage scripts (docs/method.md section 1).

Sections, in the order a run meets them:
1. settings: the stage's dataclasses from a settings file and flags (`parse_args`), RunArgs;
2. data: reading a split, the data's fingerprint, the bad-rows list, the model and data paths;
3. the run folder: its fingerprint, its claim and lock (`claim_output_dir`), files written whole,
   JSON lines (`read_jsonl`, `write_lines`);
4. precision and FSDP hooks;
5. checkpoints: one contract for both trainers (`save_checkpoint` with its checksums and model card,
   `find_checkpoint`, `restore`);
6. timing, memory and MFU;
7. the numerical guard (grpo.py);
8. how a run ends: stop signals and one-line errors (`run_main`).
"""

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

import reward

# ---------------------------------------------------------------------------------------------
# 1. Settings: dataclasses from a settings file and flags
# ---------------------------------------------------------------------------------------------


@dataclass
class RunArgs:
    """Where a run writes, how it saves, logs and computes: knobs that never change what the
    algorithm computes, apart from --mixed_precision (the arithmetic) which is fingerprinted."""

    output_dir: str = field(default="runs/out", metadata={
        "help": "The run folder (default runs/<stage>): run.json, metrics.jsonl, checkpoint-{step}/, final/."})
    resume: str | None = field(default=None, metadata={
        "help": "A checkpoint-{step} folder, or 'latest' (the newest complete one in --output_dir; the "
                "run starts afresh when there is none, and a finished run is left as it is)."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps (0: only final/)."})
    save_total_limit: int | None = field(default=None, metadata={
        "help": "Keep only the newest N checkpoint-{step} folders (default: all, as transformers does)."})
    save_dtype: str = field(default="auto", metadata={
        "help": "dtype of the model files written (final/ and the model of each checkpoint-{step}/): "
                "bfloat16, float32, or auto: bfloat16 after a bf16 run (as the hub checkpoints), float32 "
                "after an fp32 one. training_state/ always keeps the fp32 master weights for resuming."})
    save_final: bool = field(default=True, metadata={
        "help": "Write final/ (model and processor) and report.html when the run completes. False: nothing "
                "at the end (benchmarks). A run that completes never writes its optimizer state: a finished "
                "run resumes only to be extended, from its newest checkpoint."})
    mixed_precision: str = field(default="auto", metadata={
        "help": "auto: bf16 autocast on a GPU (the paper), fp32 on a CPU. bf16: bf16 autocast anywhere "
                "(a CPU with bf16 support included). no: fp32. The weights stay fp32 (the optimizer's "
                "master copy); this flag wins over an accelerate config's mixed_precision."})
    report_to: str = field(default="none", metadata={
        "help": "none, tensorboard or wandb: also log every step's metrics there (OUTPUT_DIR/<stage> "
                "for tensorboard). The package must be installed (requirements.txt pins tensorboard)."})
    on_bad_row: str = field(default="error", metadata={
        "help": "error: stop, naming every bad row. skip: leave them out, listed in bad_rows.jsonl."})
    push_to_hub: bool = field(default=False, metadata={
        "help": "Upload final/ (model, processor, model card) to the Hugging Face hub when the run "
                "completes. The hub and a token are checked before any work."})
    hub_model_id: str | None = field(default=None, metadata={
        "help": "With --push_to_hub: the repository, NAME or USER/NAME (default: the name of --output_dir). "
                "Created private if it does not exist."})


# Fields, in any stage's dataclasses, that never change what a run computes, so they stay out of
# its fingerprint: where things are (the fingerprints of the data and the model stand for them),
# how often and how much is saved or logged, how a batch is cut into forward passes (the losses are
# exact under any split), how a pass is computed (--share_prompt: the same numbers in another order
# of fp32 sums, the size of the rounding a change of --micro_batch_size makes), the engine's memory,
# the guard's thresholds, and --on_bad_row (a run with "error" that runs had no bad row, so "skip"
# gives the same output). Every other field is a setting.
NOT_SETTINGS = frozenset((
    "model", "data", "eval_data", "output_dir", "resume", "save_steps", "save_total_limit", "save_dtype",
    "save_final", "report_to", "on_bad_row", "micro_batch_size", "eval_batch_size", "gradient_checkpointing",
    "logprob_chunk_tokens", "share_prompt", "peak_flops", "vllm_memory", "vllm_sleep", "max_skipped_steps",
    "collapse_steps", "dataloader_num_workers", "num_proc", "regrade", "compare", "paper", "curves",
    "push_to_hub", "hub_model_id", "log_completions", "report"))


def settings(*args) -> dict:
    """The fields of a stage's dataclasses that change what it computes (all but NOT_SETTINGS).
    --engine is left out at its default, hf, the reference."""
    found = {}
    for obj in args:
        found.update({k: v for k, v in asdict(obj).items() if k not in NOT_SETTINGS})
    if found.get("engine") == "hf":
        del found["engine"]
    return found


SETTINGS_FILES = (".yaml", ".yml", ".json")


def parse_args(*classes, argv=None, defaults: dict | None = None):
    """The stage's dataclasses from the command line, TRL-style: a YAML or JSON settings file gives
    values (`python grpo.py configs/grpo_m23k.yaml`, or `--config FILE`, anywhere on the line), and
    flags override them wherever they stand (`... --learning_rate 2e-6`). transformers'
    HfArgumentParser does the parsing; the file's values become the parser's defaults, so a flag
    always wins and a field the file sets is no longer required on the command line. `defaults`: the
    stage's own defaults for fields of shared dataclasses (RunArgs' output_dir). Returns one instance
    per class (a tuple when several).

    Every mistake is a one-line SystemExit naming it, before any model work: an unknown flag or
    settings key (with the closest known one), a bad value, a missing or malformed file. Flags match
    whole: argparse's prefix matching is off, so a typo like --max_step is an error, not --max_steps.
    `--help` shows every flag's default.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(classes, allow_abbrev=False)

    def error(message):  # argparse's own errors (a bad value, a missing flag): one line, no usage block
        raise SystemExit(message)

    parser.error = error
    for action in parser._actions:
        if action.help is None:  # argparse shows a default only beside a help text
            action.help = "default: %(default)s"
    parser.set_defaults(**(defaults or {}))
    path, argv = settings_file(argv, parser)
    if path is not None:
        values = read_settings(path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"{path}: unknown setting(s) {', '.join(map(repr, unknown))}{closest(unknown[0], known)} "
                             f"for {', '.join(c.__name__ for c in classes)}")
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = {o for action in parser._actions for o in action.option_strings}
        raise SystemExit(f"unknown argument {unknown[0]!r}{closest(unknown[0].split('=')[0], flags)}; "
                         "--help lists every flag")
    parsed = parser.parse_args_into_dataclasses(argv)
    return parsed[0] if len(classes) == 1 else parsed


def closest(name: str, known) -> str:
    """' (did you mean X?)' for the known name closest to a mistyped one, or ''."""
    import difflib

    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {match[0]}?)" if match else ""


def settings_file(argv: list[str], parser) -> tuple[str | None, list[str]]:
    """(the settings file, the other arguments): `--config FILE`, `--config=FILE`, or a bare argument
    ending in .yaml, .yml or .json that is not a flag's value (`--data rows.json` is data)."""
    takes_value = {o for action in parser._actions if action.nargs != 0 for o in action.option_strings}
    files, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--config":
            if i + 1 == len(argv):
                raise SystemExit("--config needs a settings file (YAML or JSON)")
            files.append(argv[i + 1])
            i += 2
            continue
        previous = argv[i - 1] if i else ""
        if token.startswith("--config="):
            files.append(token.split("=", 1)[1])
        elif token.endswith(SETTINGS_FILES) and not token.startswith("-") and previous not in takes_value:
            files.append(token)
        else:
            rest.append(token)
        i += 1
    if len(files) > 1:
        raise SystemExit(f"one settings file at a time, got {', '.join(files)}")
    return (files[0] if files else None), rest


def read_settings(path: str) -> dict:
    """A settings file's {setting: value}, or a SystemExit naming the file and what is wrong."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such settings file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            values = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    else:
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise SystemExit(f"{path}: not valid YAML ({getattr(err, 'problem', None) or err}{where})") from None
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: a settings file holds `setting: value` lines, not a {type(values).__name__}")
    return values


def refuse_nonsense(args, not_negative: tuple[str, ...]) -> None:
    """A named error, before any work, for a trainer's settings that cannot mean anything: one of
    `not_negative` below 0, or no step to train (--max_steps and --num_epochs both 0 or less)."""
    for flag in not_negative:
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} {getattr(args, flag)} is negative; it must be 0 or more")
    if args.max_steps <= 0 and args.num_epochs <= 0:
        raise ValueError("--max_steps and --num_epochs are both 0 or less: nothing to train")


def refuse_below_one(args, flags: tuple[str, ...]) -> None:
    """A named error, before any work, for a count or size below 1 (no prompt in a batch, no token
    to generate); otherwise a division by zero, range()'s or transformers' error comes later, after
    the run folder is claimed. A flag left at None (no limit) passes."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} {value} must be 1 or more")


def refuse_bad_sampling(temperature: float, top_p: float = 1.0) -> None:
    """What both engines can sample with: --temperature 0 (greedy) or more, --top_p above 0 and at
    most 1."""
    if temperature < 0:
        raise ValueError(f"--temperature {temperature} is negative; it must be 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p {top_p} must be above 0 and at most 1")


def tracker(report_to: str) -> str | None:
    """accelerate's `log_with` for --report_to (none, tensorboard or wandb). accelerate silently
    drops a tracker whose package is not installed (the run then logs nothing there), so a missing
    one is an error here, before any work."""
    if report_to == "none":
        return None
    if report_to not in ("tensorboard", "wandb"):
        raise ValueError(f"--report_to must be none, tensorboard or wandb, got {report_to!r}")
    from accelerate.tracking import get_available_trackers

    if report_to not in {str(t) for t in get_available_trackers()}:
        raise SystemExit(f"--report_to {report_to}: the {report_to} package is not installed. Install it "
                         f"(pip install {report_to}; requirements.txt pins tensorboard) or pass "
                         f"--report_to none.")
    return report_to


# ---------------------------------------------------------------------------------------------
# 2. Data: a split in the schema, its fingerprint, the skipped rows
# ---------------------------------------------------------------------------------------------

def load_split(data: str, split: str, columns=reward.SCHEMA_COLUMNS):
    """A schema dataset from a `save_to_disk` folder, parquet/jsonl file(s), or a hub id.

    Refuses, naming the data, an empty set or one without a column a stage needs: better now than
    after the first batch.
    """
    import datasets

    if os.path.isdir(data) and any(os.path.exists(os.path.join(data, f))
                                   for f in ("dataset_dict.json", "state.json")):
        try:
            loaded = datasets.load_from_disk(data)
        except IndexError:  # datasets 5.2 fails so on a saved split of zero rows
            raise ValueError(f"{data}: a split saved with no rows (the dataset is empty)") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{data}: no split {split!r} (it has {list(loaded)})")
            loaded = loaded[split]
    elif data.endswith((".parquet", ".jsonl", ".json")):
        if not os.path.isfile(data):
            raise FileNotFoundError(f"{data}: no such file")
        if os.path.getsize(data) == 0:  # datasets' json reader raises a bare StopIteration
            raise ValueError(f"{data}: the file is empty (no rows)")
        kind = "parquet" if data.endswith(".parquet") else "json"
        try:
            loaded = datasets.load_dataset(kind, data_files=data, split="train")
        except ValueError as err:  # an empty parquet file: 'Instruction "train" corresponds to no data'
            if "corresponds to no data" in str(err):
                raise ValueError(f"{data}: the file holds no rows") from None
            raise
    elif os.path.exists(data) or looks_like_a_path(data):
        if not os.path.isdir(data):
            raise FileNotFoundError(f"{data}: no such data folder or file (a save_to_disk folder, a .parquet, "
                                    ".jsonl or .json file, or a hub id)")
        loaded = datasets.load_dataset(data, split=split)  # a folder of data files
    else:
        try:
            loaded = datasets.load_dataset(data, split=split)
        except (FileNotFoundError, ConnectionError) as err:  # DatasetNotFoundError is a FileNotFoundError
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FileNotFoundError(f"{data}: not a local folder or file, and the hub cannot give it ({first})") from None
    where = f"{data}" + (f" (split {split})" if split else "")
    if len(loaded) == 0:
        raise ValueError(f"{where}: the dataset is empty (no rows)")
    missing = [c for c in columns if c not in loaded.column_names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; the schema needs {list(columns)} "
                         f"(it has {loaded.column_names})")
    return loaded


def looks_like_a_path(name: str) -> bool:
    """Whether a --model or --data value can only be a local path: a hub id is `name` or `org/name`."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model(model: str, flag: str = "--model") -> None:
    """A named error, before any work, for a --model that is neither a model folder nor a hub id the
    hub (or, offline, its local cache) can give."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"{flag} {model}: a folder without config.json, not a saved model "
                                    "(pass a save_pretrained folder such as RUN/final, or a hub id)")
        return
    if os.path.exists(model) or looks_like_a_path(model):
        raise FileNotFoundError(f"{flag} {model}: no such model folder")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise FileNotFoundError(f"{flag} {model}: not a local folder, and not in the hub cache "
                                f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set")


def data_dir(data: str) -> str:
    """Where relative image paths of a data set are read from: a data file's folder, or the folder."""
    return data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))


def data_fingerprint(dataset) -> str:
    """datasets' fingerprint of the loaded split: it changes when the files behind it change. Image
    files referenced by path are not part of it: replacing one under the same name goes unseen."""
    return dataset._fingerprint


def file_fingerprint(path: str, flag: str | None = None) -> str:
    """A file input (CSV, predictions) by its content: a changed file is another run, a file
    rewritten with the same bytes (evaluate.py finishing again) is not. About 1 s a gigabyte.
    flag: the command-line flag that named the file, for the error when there is none."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag + ' ' if flag else ''}{path}: no such file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model: str) -> str:
    """A local model folder: a digest of its files' names, sizes and modification times, so a model
    trained again into the same folder is another model (reading it changes none of them). A hub id
    stands for itself."""
    if not os.path.isdir(model):
        return model
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(model), key=lambda e: e.name):
        if entry.is_file():
            stat = entry.stat()
            digest.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def write_bad_rows(bad: list[dict], output_dir: str) -> None:
    """The skipped rows, one JSON line each, in the stage's output folder."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "bad_rows.jsonl"), "w", encoding="utf-8") as f:
        for item in bad:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# 3. The run folder
# ---------------------------------------------------------------------------------------------

RUN_FILE = "run.json"


def claim_output_dir(output_dir: str, fingerprint: dict, resume: bool, inputs=(),
                     schedule: str | None = None) -> None:
    """Make `output_dir` this run's folder, or refuse, saying how to go on.

    `fingerprint` names what makes a run this run (the stage, the settings that change its results,
    the input data's fingerprint). It is written to run.json in a new or empty folder. A folder of
    another run (different fingerprint, or files but no run.json) is never written into; a folder of
    this very run is continued only with `resume` (evaluate.py always resumes: its predictions are
    reused). Nothing already computed is ever overwritten or silently mixed. A folder inside one of
    `inputs` (the data and model folders) is refused, and so is a folder another process holds
    (`lock_output_dir`). A trainer's run made longer is this run extended (`extend_run`), where its
    learning-rate `schedule` allows it.
    """
    inside = next((i for i in inputs if is_inside(output_dir, i)), None)
    if inside is not None:
        raise SystemExit(f"--output_dir {output_dir} is inside the input folder {inside}; a run never "
                         "writes into its inputs. Choose a folder outside it.")
    path = os.path.join(output_dir, RUN_FILE)
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))  # as stored
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        longer = lengthened(previous, fingerprint) if resume and schedule else None
        if longer:
            return extend_run(output_dir, previous, fingerprint, longer, schedule)
        if previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint)
                             if previous.get(k) != fingerprint.get(k))
            before, now = previous.get("settings", {}), fingerprint.get("settings", {})
            detail = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise SystemExit(
                f"{output_dir} holds another run ({', '.join(changed)} differ"
                + (f": {', '.join(detail)}" if detail else "") + "). Choose another --output_dir, "
                f"or delete {output_dir} to start over.")
        if not resume:
            raise SystemExit(f"{output_dir} holds this run already. Pass --resume latest to continue "
                             f"it, or delete {output_dir} to start over.")
        lock_output_dir(output_dir)
        return
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise SystemExit(f"{output_dir} is not empty and is not a run folder of this project (no "
                         f"{RUN_FILE}). Choose another --output_dir, or empty it.")
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    lock_output_dir(output_dir)
    _FRESH.setdefault(os.path.realpath(output_dir), created)  # ours now: given back if the start fails
    if os.path.isfile(path):  # another run claimed it between our look and our lock
        release_output_dir(output_dir)
        return claim_output_dir(output_dir, fingerprint, resume, inputs, schedule)
    write_text(path, json.dumps(fingerprint, indent=1, sort_keys=True))


LENGTHS = ("max_steps", "num_epochs")  # the settings that only say where a trainer's run ends


def lengthened(previous: dict, fingerprint: dict) -> tuple[str, object, object] | None:
    """(flag, before, now) when `fingerprint` is `previous` with the run made longer: --max_steps
    raised, or --num_epochs raised where no --max_steps is set; None otherwise."""
    before, now = previous.get("settings", {}), fingerprint.get("settings", {})
    if {k: v for k, v in previous.items() if k != "settings"} != \
            {k: v for k, v in fingerprint.items() if k != "settings"}:
        return None
    if {k: v for k, v in before.items() if k not in LENGTHS} != {k: v for k, v in now.items() if k not in LENGTHS}:
        return None
    steps = (before.get("max_steps", -1), now.get("max_steps", -1))
    if steps[0] > 0 and steps[1] > steps[0] and before.get("num_epochs") == now.get("num_epochs"):
        return "max_steps", *steps
    epochs = (before.get("num_epochs"), now.get("num_epochs"))
    if steps[0] <= 0 and steps[1] == steps[0] and isinstance(epochs[0], int) and epochs[1] > epochs[0]:
        return "num_epochs", *epochs
    return None


def extend_run(output_dir: str, previous: dict, fingerprint: dict, longer: tuple, schedule: str) -> None:
    """A run continued past the end it was given (`--resume latest` with a larger --max_steps or
    --num_epochs): the same run only if every step already taken had the learning rate it would have
    had in the longer run, which holds for a constant schedule and for no schedule laid out over the
    run's length (cosine, linear, warmup as a share of the steps). So the others are refused, saying
    why. An extended run resumes from its newest checkpoint (the steps after it are computed again, as
    any resume does: a run's end keeps no optimizer state), and its final/ moves aside to
    final-{flag}-{before} rather than be overwritten. run.json then records the new length."""
    flag, before, now = longer
    if schedule != "constant":
        raise SystemExit(
            f"--{flag} {now}: {output_dir} was trained for --{flag} {before} with a {schedule} learning-rate "
            f"schedule, laid out over the run's length: a longer run would have given every step taken "
            f"another learning rate, so it is not this run continued. Train a new run from "
            f"{os.path.join(output_dir, 'final')} (--model), or use a constant schedule.")
    lock_output_dir(output_dir)
    final = os.path.join(output_dir, "final")
    if os.path.isdir(final):
        os.replace(final, f"{final}-{flag}-{before}")
    write_text(os.path.join(output_dir, RUN_FILE), json.dumps(fingerprint, indent=1, sort_keys=True))
    print(f"{output_dir}: extending the run from --{flag} {before} to {now} (constant learning rate); "
          f"its final model moved to {final}-{flag}-{before}")


def is_inside(path: str, folder) -> bool:
    """Whether `path` is the folder `folder` or lies under it (an existing local folder; a hub id or
    a file is no folder)."""
    if not isinstance(folder, str) or not os.path.isdir(folder):
        return False
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


# One writer per run folder: the process that claimed it holds an exclusive flock on the folder
# itself (no lock file: nothing is left behind) for the rest of its life. The kernel drops a flock
# when its process ends, however it ends, so a killed run never blocks the next one. flock is
# advisory: it keeps out this project's runs, not other programs.
_LOCKS: dict[str, int] = {}
# Folders this process claimed afresh: {path: whether it created the folder}. A run that fails
# before writing anything but run.json (and the bad-rows list) gives them back (`release_failed_starts`).
_FRESH: dict[str, bool] = {}
START_FILES = {RUN_FILE, "bad_rows.jsonl"}  # what a run writes before its first result


def release_failed_starts() -> None:
    """After a failed start: each folder this process claimed afresh that holds nothing but
    START_FILES loses them (and is removed if this process made it), so that the corrected command
    runs in the same folder."""
    for folder, created in _FRESH.items():
        if folder in _LOCKS and os.path.isdir(folder) and set(os.listdir(folder)) <= START_FILES:
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
            release_output_dir(folder)
            if created:
                os.rmdir(folder)
    _FRESH.clear()


def lock_output_dir(output_dir: str) -> None:
    """Hold `output_dir` for this process (again: nothing to do), or exit naming the holder."""
    import fcntl

    key = os.path.realpath(output_dir)
    if key in _LOCKS:
        return
    fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"{output_dir} is in use by another run ({lock_holder(key)}). Wait for it to "
                         "end, or choose another --output_dir.") from None
    except OSError as err:  # a file system without locks (some NFS mounts): run, but say so
        print(f"warning: {output_dir} cannot be locked ({err.strerror}); nothing keeps a second run "
              "out of it", file=sys.stderr)
    _LOCKS[key] = fd


def release_output_dir(output_dir: str) -> None:
    """Let another run have `output_dir` (the end of a run; a process that ends releases it anyway)."""
    fd = _LOCKS.pop(os.path.realpath(output_dir), None)
    if fd is not None:
        os.close(fd)


def lock_holder(folder: str) -> str:
    """The process holding a flock on `folder`, from Linux's /proc/locks: 'pid N: its command'."""
    try:
        inode = os.stat(folder).st_ino
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and fields[-3].rsplit(":", 1)[-1] == str(inode):
                    pid = fields[-4]
                    with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                        command = " ".join(cmd.read().decode(errors="replace").replace("\0", " ").split())
                    return f"pid {pid}: {command}"
    except (OSError, IndexError):
        pass
    return "a process this machine cannot see, or one that just ended"


def write_text(path, text: str) -> None:
    """A file written whole or not at all (a .tmp file renamed): a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, obj) -> None:
    """A JSON file written whole (write_text)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# Files written whole, and JSON lines: the prediction files of evaluate.py and the official code.


def read_jsonl(path, complete_only: bool) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each JSON line of a file, split on "\\n" and nothing else.

    json.dumps(..., ensure_ascii=False), as the official code and we write these files, leaves
    U+2028, U+2029 and U+0085 raw inside a response, and str.splitlines() ends a line at each of
    them. Iterating over a text file does not, but with the default newline=None it ends a line at
    a bare "\\r" too and turns "\\r\\n" into "\\n". newline="\\n" splits on "\\n" only and
    changes no character: a file with "\\r\\n" ends still parses ("\\r" is JSON whitespace), and a
    raw "\\r" inside a string (invalid JSON, but some writers leave it) stays in its response,
    where the evaluation rule reads it as a line end (strict=False accepts it).
    complete_only: a last line without its newline (a kill while writing it) is not done yet.
    """
    with open(path, encoding="utf-8", newline="\n") as f:
        for number, text in enumerate(f, 1):
            if complete_only and not text.endswith("\n"):
                return
            if not text.strip():
                continue
            try:
                yield number, json.loads(text, strict=False)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: not JSON ({err})") from None


def drop_torn_tail(path) -> None:
    """Cut a partial last line off before appending to a file again (b"\\n" never occurs inside a
    UTF-8 multi-byte character, so bytes are safe here)."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def write_lines(path, lines: list[dict]) -> None:
    """JSON lines (ensure_ascii=False, as the official files), written whole (write_text)."""
    write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


def part_files(output_dir, name: str) -> list[str]:
    """The parts NAME.rank*.jsonl that the processes of a run append to, in a folder."""
    folder = str(output_dir)
    names = sorted(p for p in os.listdir(folder) if p.startswith(f"{name}.rank") and p.endswith(".jsonl")) \
        if os.path.isdir(folder) else []
    return [os.path.join(folder, p) for p in names]


def saved_lines(output_dir, name: str, key) -> dict:
    """Every line of NAME.jsonl in a folder and of its parts (part_files), by `key(line)`: what a run
    writing them has done so far (a part's torn last line is not done). The files are the record:
    whatever a kill leaves is reused, and a merge reads them rather than gathering objects in memory."""
    found = {}
    for path in [os.path.join(str(output_dir), f"{name}.jsonl"), *part_files(output_dir, name)]:
        if os.path.exists(path):
            for _, line in read_jsonl(path, complete_only=True):
                found.setdefault(key(line), line)
    return found


def answer_lines(state, output_dir, name: str, lines: list[dict], ask: list[bool], batch_size: int, respond,
                 key, show: bool = True) -> list[dict] | None:
    """Each line once with what `respond(batch of lines)` gives it (a list of dicts, one per line, merged
    into it), written to OUTPUT_DIR/NAME.jsonl in the lines' order; a line not to `ask` is written as is.
    `key(line)` names a line (unique).

    The lines are cut into fixed batches in their order; the batches are dealt to the processes in
    turn (`state`: an accelerate state), each process appending its answers to its own part
    NAME.rank{i}.jsonl, one flushed write per batch, so a kill loses at most the batch in flight. A
    batch runs again whole when any of its lines is missing, so a resumed run gives every line the
    neighbours of an uninterrupted one. SIGTERM stops after the batch (exit STOPPED). Returns the
    merged lines on the main process (None on the others); the parts are then removed.
    """
    done = saved_lines(output_dir, name, key)
    state.wait_for_everyone()  # every process has read what is done before any writes more
    asked = [line for line, a in zip(lines, ask) if a]
    batches = [asked[i : i + batch_size] for i in range(0, len(asked), batch_size)]
    pending = [b for b in batches if any(key(line) not in done for line in b)]
    mine = pending[state.process_index :: state.num_processes]
    part = os.path.join(str(output_dir), f"{name}.rank{state.process_index}.jsonl")
    drop_torn_tail(part)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(map(len, mine)), unit="line", desc=f"{name} rank {state.process_index}", disable=not show)
    started = time.time()
    with open(part, "a", encoding="utf-8") as f:
        for batch in mine:
            answers = respond(batch)
            new = [dict(line, **answer) for line, answer in zip(batch, answers) if key(line) not in done]
            f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in new))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
            stop = stop_requested()
            if stop:
                bar.close()
                print(f"rank {state.process_index}: stopped by {stop}; its answers are in {part}. "
                      "Run the same command again to answer the rest.")
                raise SystemExit(STOPPED)
    bar.close()
    if mine:
        print(f"rank {state.process_index}: {sum(map(len, mine))} answers in {time.time() - started:.1f} s")
    state.wait_for_everyone()
    merged = None
    if state.is_main_process:
        found = saved_lines(output_dir, name, key)
        merged = [found[key(line)] if a else line for line, a in zip(lines, ask)]
        write_lines(os.path.join(str(output_dir), f"{name}.jsonl"), merged)
        for path in part_files(output_dir, name):
            os.remove(path)
    state.wait_for_everyone()
    return merged


def git_hash(what: str = "--short") -> str | None:
    """This project's commit (short; `--abbrev-ref` for its branch), or None outside a git checkout
    or without git."""
    try:
        found = subprocess.run(["git", "rev-parse", what, "HEAD"], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if found.returncode != 0:
        return None
    return found.stdout.strip() or None


# ---------------------------------------------------------------------------------------------
# 4. Precision and FSDP
# ---------------------------------------------------------------------------------------------


def precision(mixed_precision: str) -> str:
    """accelerate's mixed_precision for --mixed_precision: auto is bf16 on a GPU, no (fp32) on a CPU."""
    if mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"--mixed_precision must be auto, bf16 or no, got {mixed_precision!r}")
    if mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return mixed_precision


def saved_dtype(save_dtype: str, mixed_precision: str):
    """The torch dtype of the model files a run writes, for --save_dtype. auto: bf16 after a bf16
    run, as the hub's Qwen2.5-VL and MedVLThinker checkpoints are, half the size of fp32, and losing
    nothing a bf16 forward pass sees (it computes with bf16 copies of the weights); fp32 after an
    fp32 run, so that CPU runs (the demo, the tests) keep their exact weights."""
    choices = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if save_dtype == "auto":
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    if save_dtype not in choices:
        raise ValueError(f"--save_dtype must be auto, bfloat16 or float32, got {save_dtype!r}")
    return choices[save_dtype]


def accelerator_for(run: RunArgs):
    """The run's Accelerator, once --on_bad_row and --save_dtype are known good: --mixed_precision (bf16 autocast, on a GPU or a CPU), the tracker, and
    DDP's find_unused_parameters (a process whose micro-batch has no image leaves the vision tower
    without gradient, docs/method.md section 9)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if run.on_bad_row not in ("error", "skip"):
        raise ValueError(f"--on_bad_row must be error or skip, got {run.on_bad_row!r}")
    saved_dtype(run.save_dtype, "no")  # a wrong --save_dtype fails now, not at the end of the run
    if run.push_to_hub:  # the hub is checked now, not after hours of training
        run.hub_model_id = hub_repo(run)
    return Accelerator(mixed_precision=precision(run.mixed_precision), log_with=tracker(run.report_to),
                       project_dir=run.output_dir,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def hub_repo(run: RunArgs) -> str:
    """--push_to_hub's repository, USER/NAME, once the hub is known to be reachable with a token that
    may write: HF_HUB_OFFLINE, no token, a refused token and an unreachable hub are each named."""
    from huggingface_hub import HfApi, constants, get_token

    if not run.save_final:
        raise SystemExit("--push_to_hub uploads final/, which --save_final False does not write")
    if constants.HF_HUB_OFFLINE:
        raise SystemExit("--push_to_hub: the hub is switched off here (HF_HUB_OFFLINE=1). Train without "
                         "it and upload final/ later from a machine online: hf upload USER/NAME DIR/final")
    if get_token() is None:
        raise SystemExit("--push_to_hub: no Hugging Face token. Run `hf auth login`, or set HF_TOKEN")
    try:
        user = HfApi().whoami()["name"]
    except Exception as err:  # an HTTP refusal or no network: one line, before any work
        raise SystemExit(f"--push_to_hub: the hub at {constants.ENDPOINT} did not accept the token "
                         f"({one_line(err)})") from None
    name = run.hub_model_id or os.path.basename(os.path.abspath(run.output_dir))
    return name if "/" in name else f"{user}/{name}"


def one_line(err: BaseException) -> str:
    """An exception as `Type: its first line`, for a one-line error."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def push_final(run: RunArgs, final: str, accelerator) -> None:
    """Upload final/ to --hub_model_id (the main process). A failure is named with the folder, which
    stays saved: `hf upload` sends it later."""
    if not run.push_to_hub or not accelerator.is_main_process:
        return
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(run.hub_model_id, private=True, exist_ok=True)
        url = api.upload_folder(repo_id=run.hub_model_id, folder_path=final,
                                commit_message=f"{os.path.basename(os.path.abspath(run.output_dir))}: final")
    except Exception as err:  # noqa: BLE001 - the model is saved; say so rather than lose the line
        raise SystemExit(f"--push_to_hub: uploading {final} to {run.hub_model_id} failed ({one_line(err)}); "
                         f"the model is saved there: hf upload {run.hub_model_id} {final}") from None
    print(f"pushed {final} to {url}")


def is_fsdp(accelerator) -> bool:
    from accelerate import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def run_vision_on_every_forward(model) -> None:
    """Under FSDP, make every forward pass run the vision tower, with images or without.

    FSDP all-gathers each wrapped unit (every decoder layer and vision block, configs/fsdp.yaml) as
    it runs, and all processes must issue the same all-gathers in the same order. A micro-batch or a
    generate call without images skips the vision blocks; if another process's has images, the
    collectives no longer match: on gloo the run dies with "Received data size doesn't match
    expected size" (measured, tests/test_fsdp.py), on NCCL it would hang or mix up buffers. DDP
    handles the same case with find_unused_parameters. So a forward without pixel_values (that is
    not a decoding step of generate, where no process runs the tower) sends one dummy image of 2 x 2
    patches (one token after the merge) through the tower first, and adds 0 x its sum to the input
    embeddings (generate, in transformers 5, runs the tower on real images before its first forward,
    passing `mm_encoder_outputs`; no collective comes in between, so the order still matches): the
    numbers are unchanged, and every vision parameter joins the backward pass with
    an exact zero gradient.
    """
    inner = model.model  # Qwen2_5_VLModel: embeddings, vision tower, decoder
    vision = model.config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    side = vision.spatial_merge_size

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        encoded = kwargs.get("mm_encoder_outputs") or {}  # generate runs the tower before its first forward
        if (kwargs.get("pixel_values") is not None or encoded.get("image") is not None
                or (cache is not None and cache.get_seq_length() > 0)):
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = inner.get_input_embeddings()(kwargs["input_ids"])
        pixels = torch.zeros(side * side, patch_dim, dtype=inner.visual.dtype, device=embeds.device)
        grid = torch.tensor([[1, side, side]], device=embeds.device)
        dummy = inner.visual(pixels, grid_thw=grid).pooler_output
        return args, dict(kwargs, inputs_embeds=embeds + 0.0 * dummy.sum().to(embeds.dtype))

    inner.register_forward_pre_hook(hook, with_kwargs=True)


def fsdp_mixed_precision(accelerator) -> None:
    """Under FSDP with bf16, gradients reduced in fp32 and outputs left as the forward made them.

    accelerate's bf16 policy for FSDP computes with bf16 parameters and also reduces gradients in
    bf16, keeps FSDP (v1) buffers (the rotary frequencies) in bf16, and has FSDP2 cast every output
    to bf16: then the fp32 log-probs and losses computed inside the forward come out rounded to bf16
    (measured on 2 CPU processes: log-probs like -1.7890625), and a sum over 8 GPUs' gradients
    loses bits. So, as verl's FSDP workers do: parameters bf16, reductions and buffers fp32, no
    output cast. Called before accelerator.prepare, which applies the plugin's policy.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if not is_fsdp(accelerator) or plugin is None or plugin.mixed_precision_policy is None:
        return
    extra = {"output_dtype": None} if accelerator.is_fsdp2 else {"buffer_dtype": torch.float32}
    plugin.mixed_precision_policy = dataclasses.replace(plugin.mixed_precision_policy,
                                                        reduce_dtype=torch.float32, **extra)


def prepare(accelerator, model, optimizer, scheduler):
    """accelerate's prepare for a trainer: FSDP's hooks first (the dummy image on several processes,
    fp32 reductions), the scheduler registered but not prepared (accelerate would step it once per
    process per optimizer step; registered, save_state still keeps it)."""
    if is_fsdp(accelerator) and accelerator.num_processes > 1:
        run_vision_on_every_forward(model)
    fsdp_mixed_precision(accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer


# ---------------------------------------------------------------------------------------------
# 5. Checkpoints: one contract for sft.py and grpo.py (docs/method.md section 10)
# ---------------------------------------------------------------------------------------------
# DIR/checkpoint-{step}/ holds the model and processor (save_pretrained, loadable like a hub id),
# training_state/ (accelerator.save_state: the fp32 weights, optimizer, scheduler, every process's
# RNG) and resume_state.json (the step and what the stage adds), written last. DIR/final/ holds the
# model and processor only: a finished run resumes only to be extended, from its newest checkpoint.

TRAINING_STATE = "training_state"
RESUME_STATE = "resume_state.json"
# Not trainer_state.json: transformers' Trainer writes its own state there, in another schema
# (log_history, ...). A checkpoint holding this file under that name still resumes.
OLD_RESUME_STATE = "trainer_state.json"


def state_file(checkpoint: str) -> str | None:
    """The checkpoint's resume state file, or None: the checkpoint is not complete."""
    for name in (RESUME_STATE, OLD_RESUME_STATE):
        if os.path.isfile(os.path.join(checkpoint, name)):
            return os.path.join(checkpoint, name)
    return None


def save_model(accelerator, model, processor, folder: str, dtype) -> None:
    """The model and processor as a save_pretrained folder whose weights and config.json are `dtype`
    (a torch dtype, `saved_dtype`), so that from_pretrained (dtype "auto") loads it in that dtype, as
    it loads a hub checkpoint.

    Every process joins get_state_dict (FSDP gathers the shards); the main one writes. A tied output
    layer (the 3B's) must be one tensor for save_pretrained to store it once; FSDP's gathered state
    dict holds two equal copies, so the tie is restored first. Tensors that share storage are
    converted once, so they still share it.
    """
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    for tied, source in (getattr(unwrapped, "all_tied_weights_keys", None) or {}).items():
        if tied in state_dict and source in state_dict and torch.equal(state_dict[tied], state_dict[source]):
            state_dict[tied] = state_dict[source]
    converted = {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point():
            key = (tensor.data_ptr(), tensor.shape, tensor.stride())
            if key not in converted:
                converted[key] = tensor.to(dtype)
            state_dict[name] = converted[key]
    unwrapped.save_pretrained(folder, state_dict=state_dict, save_function=accelerator.save)
    config = copy.deepcopy(unwrapped.config)  # save_pretrained wrote the parameters' dtype (fp32)
    for sub in [config] + [getattr(config, name) for name in getattr(config, "sub_configs", {})]:
        sub.dtype = dtype
    config.save_pretrained(folder)
    processor.save_pretrained(folder)


CHECKSUMS = "checksums.json"


def save_checkpoint(accelerator, model, processor, run: RunArgs, step: int, state: dict | None,
                    card: dict | None = None) -> str:
    """DIR/checkpoint-{step} with `state` (a JSON object: the stage's own resume data) in
    resume_state.json beside "step", or DIR/final (state None: the model and processor alone, and
    with `card`, {"stage", "base_model", "datasets"}, a model card: `model_card`).

    Everything is written into a .tmp folder, then renamed with os.replace: the rename is the
    completeness marker, so a run killed while saving leaves only a .tmp folder, which resuming
    ignores and removes. The last file written before the rename is checksums.json, the size and
    SHA-256 of every other file, which a resume verifies (`verified`). A save that fails on any
    process (a full disk, say) removes its .tmp folder and stops the run naming the folder, the
    cause and, for a full disk, the space free and the space the save needs (`save_failure`); earlier
    checkpoints are untouched. Then checkpoints beyond --save_total_limit go, oldest first, with
    transformers' rotate_checkpoints (accelerate's ProjectConfiguration(total_limit) rotates only its
    own checkpoints/checkpoint_{i} layout, not this one). Returns the folder.
    """
    from transformers.trainer_utils import rotate_checkpoints

    folder = os.path.join(run.output_dir, "final" if state is None else f"checkpoint-{step}")
    tmp = folder + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    dtype = saved_dtype(run.save_dtype, accelerator.mixed_precision)
    failure = None
    try:
        if state is not None:
            with tied_weights_quiet():
                accelerator.save_state(os.path.join(tmp, TRAINING_STATE))
        save_model(accelerator, model, processor, tmp, dtype)  # full weights, gathered under FSDP
        if accelerator.is_main_process and state is not None:
            with open(os.path.join(tmp, RESUME_STATE), "w") as f:
                json.dump({"step": step, **state}, f)
        if accelerator.is_main_process and card is not None:
            model_card(card, run.output_dir, step).save(os.path.join(tmp, "README.md"))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        failure = err
    failed = on_any_process(accelerator, failure is not None)
    if not failed and accelerator.is_main_process:
        try:
            write_json(os.path.join(tmp, CHECKSUMS), checksums(tmp))
        except OSError as err:
            failure = err
    if on_any_process(accelerator, failure is not None):
        message = save_failure(folder, tmp, failure, run.output_dir) if failure is not None else None
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise SaveFailed(message or f"saving {folder} failed on another process; {tmp} was removed")
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)  # saved before by this run, resumed from an older one
        os.replace(tmp, folder)
        if state is not None:
            rotate_checkpoints(run.output_dir, run.save_total_limit)
    accelerator.wait_for_everyone()
    if state is None:
        accelerator.print(f"saved {folder} ({str(dtype).removeprefix('torch.')})")
    return folder


def model_card(card: dict, output_dir: str, step: int):
    """final/README.md as the hub reads a model card (huggingface_hub's ModelCard): metadata (base
    model, datasets, library, pipeline, tags), then the command that made the model, its settings
    (run.json's) and its last logged metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_like = [d for d in card["datasets"] if not looks_like_a_path(d) and not os.path.exists(d)]
    data = ModelCardData(
        base_model=card["base_model"] if not os.path.exists(card["base_model"]) else None,
        datasets=hub_like or None, library_name="transformers", pipeline_tag="image-text-to-text",
        tags=["medvlthinker", card["stage"], "medical", "qwen2_5_vl"])
    with open(os.path.join(output_dir, RUN_FILE), encoding="utf-8") as f:
        settings = json.load(f).get("settings", {})
    last, metrics = None, os.path.join(output_dir, "metrics.jsonl")
    for _, line in read_jsonl(metrics, complete_only=True) if os.path.exists(metrics) else ():
        last = line
    shown = {k: v for k, v in (last or {}).items() if not k.startswith("time_")}
    command = " ".join([os.path.basename(sys.argv[0]) or card["stage"] + ".py", *sys.argv[1:]])
    return ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {os.path.basename(os.path.abspath(output_dir))}\n\n"
        f"{card['stage'].upper()} of `{card['base_model']}` on {', '.join(f'`{d}`' for d in card['datasets'])}, "
        f"{step} steps, with the MedVLThinker reference implementation (its `{card['stage']}.py`).\n\n"
        f"Command:\n\n```\n{command}\n```\n\nSettings (run.json):\n\n```json\n"
        f"{json.dumps(settings, indent=1, sort_keys=True)}\n```\n\n"
        f"Last logged metrics (metrics.jsonl):\n\n```json\n{json.dumps(shown, indent=1)}\n```\n")


@contextlib.contextmanager
def tied_weights_quiet():
    """Without accelerate's warning at every save of a model with tied weights ("Removed shared
    tensor {'lm_head.weight'} while saving"), printed through the progress bars: the tie is stored
    once by design, and loads back bit for bit (the resume tests)."""
    import logging

    def keep(record):
        return "Removed shared tensor" not in record.getMessage()

    logger = logging.getLogger("accelerate.utils.other")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def on_any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process (one all-reduce), so that all of them act alike."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0


class SaveFailed(OSError):
    """A checkpoint could not be written; the message names the folder and the cause."""


def save_failure(folder: str, tmp: str, err: Exception, output_dir: str) -> str:
    """One line for a failed save: the folder and the cause; for a full disk (errno ENOSPC, or
    torch.save's "unexpected pos" / "file write failed", safetensors' "StorageFull") the space free
    and about how much the save needs: the size of the newest complete checkpoint, or of what this
    save had written when it failed."""
    text = f"{type(err).__name__}: {err}"
    full = getattr(err, "errno", None) == 28 or any(
        sign in text for sign in ("No space left", "unexpected pos", "file write failed", "StorageFull"))
    if not full:
        return f"saving {folder} failed ({' '.join(text.split())[:300]}); {tmp} was removed"
    complete = [os.path.join(output_dir, n) for n in os.listdir(output_dir)
                if re.fullmatch(r"checkpoint-\d+|final", n) and os.path.isfile(
                    os.path.join(output_dir, n, CHECKSUMS))]
    sizes = [folder_size(c) for c in complete] or [folder_size(tmp)]
    free = shutil.disk_usage(output_dir).free
    return (f"saving {folder}: no space left on the device ({free / 1e9:.2f} GB free; the save needs "
            f"about {max(sizes) / 1e9:.2f} GB). {tmp} was removed and earlier checkpoints are intact; "
            "free space, then run again with --resume latest")


def folder_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder)
               for name in names)


def checksums(folder: str) -> dict:
    """{relative path: [size, sha256]} of every file under `folder`."""
    out = {}
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = [os.path.getsize(path), file_fingerprint(path)]
    return out


def damage(folder: str) -> str | None:
    """What is wrong with a saved folder against its checksums.json (a missing, resized or changed
    file), or None when every file is as saved. A folder saved without checksums.json (before this
    project wrote them) is taken as it is."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, json.JSONDecodeError):
        return f"{CHECKSUMS} is unreadable"
    for name, (size, digest) in recorded.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, {size} when saved"
        if file_fingerprint(file) != digest:
            return f"{name} differs from what was saved (SHA-256)"
    return None


def find_checkpoint(run: RunArgs, accelerator) -> str | None:
    """The folder to resume from: --resume itself (it must be a complete, intact checkpoint), or
    with 'latest' the newest complete checkpoint-{step} of --output_dir that matches its checksums
    (a damaged one is named and passed over), or None: start afresh, so that `--resume latest` is
    always safe to pass. Complete: renamed from .tmp, so holding resume_state.json."""
    if not run.resume:
        return None
    if run.resume != "latest":
        if state_file(run.resume) is None:
            raise FileNotFoundError(f"--resume {run.resume}: not a complete checkpoint (no {RESUME_STATE} "
                                    "there); pass a checkpoint-{step} folder or 'latest'")
        problem = damage(run.resume)
        if problem:
            raise ValueError(f"--resume {run.resume}: the checkpoint is damaged ({problem}); pass an "
                             "earlier checkpoint, or 'latest' to take the newest intact one")
        return run.resume
    found = sorted((int(m.group(1)), name) for name in (os.listdir(run.output_dir) if os.path.isdir(
        run.output_dir) else []) if (m := re.fullmatch(r"checkpoint-(\d+)", name))
        and state_file(os.path.join(run.output_dir, name)))
    for _, name in reversed(found):
        checkpoint = os.path.join(run.output_dir, name)
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint
        accelerator.print(f"--resume latest: {checkpoint} is damaged ({problem}); passing over it")
    accelerator.print(f"--resume latest: no {'intact' if found else 'complete'} checkpoint in "
                      f"{run.output_dir}; the run starts afresh")
    return None


def read_state(checkpoint: str | None, expect: dict | None = None) -> dict:
    """A checkpoint's resume_state.json ({"step": 0} for None: a fresh start). `expect`: values the
    checkpoint must have been saved with (the same rows in the same steps), or a named error."""
    if checkpoint is None:
        return {"step": 0}
    with open(state_file(checkpoint)) as f:
        state = json.load(f)
    for key, value in (expect or {}).items():
        if state.get(key) != value:
            raise ValueError(f"{checkpoint}: saved with {key}={state.get(key)}, this run has {value}; "
                             f"resume with the same data and batch settings")
    return state


def restore(accelerator, checkpoint: str | None, run: RunArgs, metrics_path: str, *logs: str) -> dict:
    """Load `checkpoint`'s training state (weights, optimizer, scheduler, RNG) and return its
    resume_state.json ({"step": 0} without one). Then, in the run folder: the .tmp folders of saves
    a kill interrupted are removed, and metrics.jsonl (and each of `logs`, lines with a "step") keeps
    the lines up to the checkpoint's step (later ones are computed again)."""
    state = read_state(checkpoint)
    if checkpoint is not None:
        accelerator.load_state(os.path.join(checkpoint, TRAINING_STATE))
        accelerator.print(f"resumed from {checkpoint} after step {state['step']}")
    if accelerator.is_main_process:
        remove_stale_tmp(run.output_dir)
        for path in (metrics_path, *logs):
            keep_metrics_until(path, state["step"])
    accelerator.wait_for_everyone()  # no process logs before the file is rewritten
    return state


def remove_stale_tmp(output_dir: str) -> None:
    """Delete the .tmp folders of saves a killed run never finished (checkpoint-N.tmp, final.tmp):
    a save is written to such a folder and renamed when complete (docs/method.md section 10)."""
    for name in os.listdir(output_dir):
        if re.fullmatch(r"(checkpoint-\d+|final)\.tmp", name):
            shutil.rmtree(os.path.join(output_dir, name))


def keep_metrics_until(metrics_path: str, step: int) -> None:
    """Keep the metrics.jsonl lines of steps up to `step` (the resumed checkpoint's): the ones a
    stopped run logged after its last checkpoint are computed again, and a line torn by a kill
    mid-write (not a JSON object) is dropped. Rewritten whole (write_text), so a kill now
    loses nothing. No file yet: nothing to do (the first logged line makes it)."""
    if not os.path.exists(metrics_path):
        return
    kept = []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                metrics = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(metrics, dict) and metrics.get("step", math.inf) <= step:
                kept.append(json.dumps(metrics) + "\n")
    write_text(metrics_path, "".join(kept))


# metrics.jsonl's shares, fractions 0-1 as in every table and results.json; `clipped` is the three
# clips' tokens together (completions.jsonl's per completion, the report's per step).
FRACTIONS = ("reward", "accuracy", "format_rate", "zero_advantage_groups", "truncated", "clip_low", "clip_high",
             "clip_dual", "clipped", "mfu")


def draw_curves(panels: list[tuple[str, list[dict], str]], path) -> None:
    """One panel per (title, metrics.jsonl lines, key) into `path` (a file or a buffer), as PNG.

    matplotlib is the project's one dependency beyond the paper's stack, for these pictures only.
    """
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for ax, (label, steps, key) in zip(axes.flat, panels):
        # A sparse series (a validation every N steps) shows its points: a line alone would invent
        # the steps between them.
        ax.plot([line.get("step", i + 1) for i, line in enumerate(steps)], [line[key] for line in steps],
                marker="o" if len(steps) <= 30 else None, markersize=4)
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{key} (0-1)" if key in FRACTIONS or key.startswith("val_accuracy") else key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


# The report's curves: (title, key) where metrics.jsonl has the key; `clipped` is derived.
REPORT_CURVES = (("reward", "reward"), ("KL (k3)", "kl"), ("entropy", "entropy"),
                 ("completion length (tokens)", "completion_length"), ("clipped tokens", "clipped"),
                 ("validation accuracy", "val_accuracy"), ("zero-advantage groups", "zero_advantage_groups"),
                 ("loss", "loss"))
REPORT_EXAMPLES = 10  # right and wrong answers shown per benchmark

REPORT_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>report: {title}</title>
<style>
body {{ font: 14px/1.4 sans-serif; margin: 1.5em; max-width: 1400px; }}
img.curves {{ max-width: 100%; }}
.group {{ border: 1px solid #999; margin: 0.8em 0; padding: 0.5em; }}
.group.zero {{ opacity: 0.6; border-style: dashed; }}
.completion {{ margin: 0.3em 0; padding: 0.3em; white-space: pre-wrap; font-family: monospace; }}
.r1 {{ background: #d4f4d4; }} .r0 {{ background: #f8d7d7; }} .rmid {{ background: #fff3c4; }}
.answer {{ margin: 0.3em 0; padding: 0.3em; white-space: pre-wrap; font-family: monospace; }}
.meta {{ color: #555; }}
</style></head><body>
<h1>{title}</h1>
<p class="meta">{summary}</p>
{body}
<script type="application/json" id="groups-data">{groups}</script>
<script>
const groups = JSON.parse(document.getElementById("groups-data").textContent);
const select = document.getElementById("step");
function show(step) {{
  const box = document.getElementById("groups");
  box.replaceChildren();
  for (const g of groups[step] || []) {{
    const div = document.createElement("div");
    div.className = "group" + (g.zero_advantage ? " zero" : "");
    const head = document.createElement("p");
    head.textContent = g.question + "  [answer " + g.answer_label + "]" +
      (g.zero_advantage ? "  (all rewards equal: advantage 0, this group contributes nothing)" : "");
    div.append(head);
    for (const src of g.images) {{ const img = document.createElement("img"); img.src = src; div.append(img); }}
    for (const c of g.completions) {{
      const p = document.createElement("div");
      p.className = "completion " + (c.reward >= 1 ? "r1" : c.reward <= 0 ? "r0" : "rmid");
      p.textContent = "reward " + c.reward + "  advantage " + c.advantage.toFixed(3) + "  " + c.length +
        " tokens" + (c.truncated ? " (truncated)" : "") + "  clipped " + (100 * c.clipped).toFixed(1) +
        "%\\n" + c.text;
      div.append(p);
    }}
    box.append(div);
  }}
}}
if (select) {{
  for (const step of Object.keys(groups)) {{
    const o = document.createElement("option"); o.value = step; o.textContent = "step " + step; select.append(o);
  }}
  const wanted = new URLSearchParams(location.hash.slice(1)).get("step");  // report.html#step=N
  if (wanted in groups) select.value = wanted;
  select.addEventListener("change", () => {{ show(select.value); location.hash = "step=" + select.value; }});
  show(select.value);
}}
</script></body></html>
"""


def write_report(folder: str) -> str:
    """DIR/report.html, one self-contained page (nothing fetched when it is viewed) of a run folder:
    the curves of metrics.jsonl in the project's units, and, from completions.jsonl (grpo.py
    --log_completions), a step selector showing the logged groups, each completion coloured by its
    reward with its advantage, a group of equal rewards marked as contributing nothing; for an
    evaluation folder (predictions.jsonl), per benchmark right and wrong answers with the think text
    and the extracted answer. Returns the path."""
    import html
    import io

    import reward

    folder = os.path.abspath(folder)
    stage = ""
    if os.path.isfile(os.path.join(folder, RUN_FILE)):
        with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as f:
            stage = json.load(f).get("stage", "")
    body, groups = [], {}
    metrics_path = os.path.join(folder, "metrics.jsonl")
    if os.path.isfile(metrics_path):
        lines = [line for _, line in read_jsonl(metrics_path, complete_only=True)]
        for line in lines:
            if all(line.get(k) is not None for k in ("clip_low", "clip_high", "clip_dual")):
                line["clipped"] = line["clip_low"] + line["clip_high"] + line["clip_dual"]
        panels = [(title, [x for x in lines if x.get(key) is not None], key) for title, key in REPORT_CURVES]
        panels = [panel for panel in panels if panel[1]]
        if panels:
            buffer = io.BytesIO()
            draw_curves(panels, buffer)
            body.append(f'<h2>Curves</h2><img class="curves" alt="curves" src="{png_uri(buffer)}">')
    completions_path = os.path.join(folder, "completions.jsonl")
    if os.path.isfile(completions_path):
        for _, line in read_jsonl(completions_path, complete_only=True):
            groups.setdefault(str(line["step"]), []).append(line)
        body.append('<h2>What GRPO trained on</h2><label>Logged groups of <select id="step"></select></label>'
                    '<div id="groups"></div>')
    predictions_path = os.path.join(folder, "predictions.jsonl")
    if os.path.isfile(predictions_path):
        by_benchmark: dict[str, dict[bool, list]] = {}
        for _, line in read_jsonl(predictions_path, complete_only=True):
            shown = by_benchmark.setdefault(line["dataset_name"], {True: [], False: []})
            for response, pred, correct in zip(line["responses"], line["preds"], line["correct"]):
                if len(shown[bool(correct)]) < REPORT_EXAMPLES:
                    shown[bool(correct)].append((line, response, pred))
        body.append("<h2>Answers</h2>")
        for name, shown in by_benchmark.items():
            body.append(f'<details class="benchmark"><summary>{html.escape(name)}</summary>')
            for correct, title in ((True, "right"), (False, "wrong")):
                body.append(f"<h3>{title}</h3>")
                for line, response, pred in shown[correct]:
                    think = reward.think_text(response)
                    body.append(f'<div class="answer {"r1" if correct else "r0"}">'
                                f"row {html.escape(str(line.get('dataset_index')))}: answer {html.escape(str(pred))} "
                                f"(label {html.escape(str(line['answer_label']))})\nthink: "
                                f"{html.escape(think if think is not None else '(no think block)')}</div>")
            body.append("</details>")
    if not body:
        raise SystemExit(f"--report {folder}: no metrics.jsonl, completions.jsonl or predictions.jsonl there")
    page = REPORT_PAGE.format(
        title=html.escape(f"{os.path.basename(folder)}" + (f" ({stage})" if stage else "")),
        summary=html.escape(folder), body="\n".join(body),
        groups=json.dumps(groups, ensure_ascii=False).replace("</", "<\\/"))
    path = os.path.join(folder, "report.html")
    write_text(path, page)
    return path


def png_uri(buffer) -> str:
    """PNG bytes (a BytesIO) as a data URI, for a log line or a page."""
    import base64

    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail(image, size: int = 128) -> str:
    """A PIL image as a PNG data URI at most `size` pixels a side."""
    import io

    small = image.copy()
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return png_uri(buffer)


def log_groups(accelerator, path: str, step: int, lines: list[dict]) -> None:
    """grpo.py's logged groups: lines of `path` (the main process's), and for a tensorboard tracker one
    markdown table of the step's completions (accelerate's log takes scalars only)."""
    if not accelerator.is_main_process:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    for tracker_ in accelerator.trackers:
        if tracker_.name == "tensorboard":
            rows = ["| group | reward | advantage | length | completion |", "|---|---|---|---|---|"]
            for g, line in enumerate(lines):
                rows += [f"| {g} | {c['reward']:g} | {c['advantage']:.3f} | {c['length']} | "
                         f"{c['text'][:200].replace('|', '/').replace(chr(10), ' ')} |" for c in line["completions"]]
            tracker_.writer.add_text("completions", "\n".join(rows), global_step=step)


def log(accelerator, metrics_path: str, record: dict) -> None:
    """A line of metrics.jsonl (written by the main process) and the tracker's numbers (--report_to)."""
    if accelerator.is_main_process:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])


# ---------------------------------------------------------------------------------------------
# 6. Timing, memory and model FLOPs utilisation
# ---------------------------------------------------------------------------------------------


def synced_time(device) -> float:
    """time.perf_counter() once the GPU has finished what was queued: CUDA kernels run
    asynchronously, so without the synchronize a step's (or a phase's) time would stop before its
    last kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_gb(device) -> float:
    """Peak GPU memory allocated by torch; on CPU, the peak resident memory of the process (neither
    torch nor accelerate has one call that covers both devices)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports kB


class Timer:
    """Seconds per phase of a training step (`lap`), each phase's queued GPU work included; the
    peak memory is counted from the start of the step."""

    def __init__(self, device):
        self.device, self.times = device, {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.start = synced_time(device)

    def lap(self, name: str) -> None:
        now = synced_time(self.device)
        self.times[name], self.start = now - self.start, now


def matmul_parameters(model_path: str) -> int:
    """Parameters a token multiplies by: all but the input embedding table (a lookup), the output
    layer included even when it shares that table (tied, as in Qwen2.5-VL-3B). Counted on the meta
    device from the config: no weights are read, and FSDP's sharding cannot hide any."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_path))
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    return total if model.get_output_embeddings().weight is embedding else total - embedding.numel()


def matmul_peak(device, dtype, seconds: float = 0.5) -> float:
    """FLOP/s of this device on square matmuls in the compute dtype, measured: the best a step's
    matmuls can reach here (a data sheet's peak is higher, so MFU against it is lower)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    start, runs = synced_time(device), 0
    while synced_time(device) - start < seconds:
        for _ in range(4):
            a @ b
        runs += 4
    return 2 * n ** 3 * runs / (synced_time(device) - start)


@dataclass
class Flops:
    """Model FLOPs utilisation: the FLOPs a step needs over the FLOP/s available.

    Needed: 2 N a token for each forward pass without gradient and 6 N a token for each forward and
    backward, the estimate of Kaplan et al. (2020, section 2.1), N the parameters a token multiplies
    by (`matmul_parameters`), the attention's context term left out (an estimate to compare steps
    and runs, not a profiler's count). The caller counts the tokens each pass must compute: a prompt
    shared by a group is counted once, so the ratio never exceeds what the device can do. Available:
    `peak` per process (`matmul_peak`, or --peak_flops) x processes x the step's seconds.
    """

    parameters: int  # N
    peak: float  # FLOP/s of one process's device

    def utilisation(self, forward_tokens: float, train_tokens: float, seconds: float, processes: int) -> float:
        needed = 2 * self.parameters * forward_tokens + 6 * self.parameters * train_tokens
        return needed / max(seconds * self.peak * processes, 1e-9)


def flops_of(model_path: str, accelerator, peak_flops: float = 0.0) -> Flops:
    """The run's `Flops`: the model's matmul parameters, and the device's peak in the compute dtype
    (measured once, unless given)."""
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    return Flops(matmul_parameters(model_path), peak_flops or matmul_peak(accelerator.device, dtype))


# ---------------------------------------------------------------------------------------------
# 7. The numerical guard (grpo.py; docs/method.md section 10)
# ---------------------------------------------------------------------------------------------


@dataclass
class GuardArgs:
    """The numerical guard's thresholds (grpo.py)."""

    max_skipped_steps: int = field(default=3, metadata={
        "help": "Stop after this many optimizer steps in a row skipped for a non-finite loss or "
                "gradient norm (0: never stop)."})
    collapse_steps: int = field(default=5, metadata={
        "help": "Warn when for this many steps in a row no completion has the answer format and every "
                "group's rewards are equal, and stop the run when it lasts 10 times as long (0: never)."})


@dataclass
class Guard:
    """The numerical guard of a run; its counts are saved with every checkpoint (`state`).

    - An optimizer step whose loss or gradient norm is not finite is skipped (`optimizer_step`): its
      gradients are dropped and AdamW does not step, since one NaN in its moments would reach every
      weight for good. All processes decide alike: both numbers are reduced over processes first.
    - --max_skipped_steps skipped optimizer steps in a row stop the run, naming the step and the last
      finite metrics: a run that keeps producing them is diverging, not meeting one odd batch.
    - --collapse_steps steps in a row where no completion has the answer format and every group's
      rewards are equal are warned about: every advantage is then 0, and nothing but the KL term
      moves the policy. Measured on the toy world at lr 1e-2: the policy went near uniform in one
      step and stayed there, reward 0 and gradient norm 0, without any error. A collapse lasting
      10 x --collapse_steps steps stops the run, naming the step: it is not coming back.
    """

    args: GuardArgs
    skipped_in_a_row: int = 0  # optimizer steps
    collapsed_in_a_row: int = 0  # training steps
    last_finite: dict | None = None  # a few metrics of the last step whose updates all ran

    def state(self) -> dict:
        return {"skipped_in_a_row": self.skipped_in_a_row, "collapsed_in_a_row": self.collapsed_in_a_row,
                "last_finite": self.last_finite}

    def optimizer_step(self, optimizer, scheduler, loss, grad_norm) -> bool:
        """AdamW and the scheduler step when loss and gradient norm are finite; otherwise the step is
        skipped and counted. The gradients are dropped either way. Returns whether it stepped."""
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            scheduler.step()
            self.skipped_in_a_row = 0
        else:
            self.skipped_in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
        return finite

    def after_step(self, record: dict) -> str | None:
        """Count a logged step: SystemExit after too many skipped optimizer steps in a row; the
        collapse warning (returned) on the step that completes --collapse_steps collapsed ones."""
        max_skipped, collapse_steps = self.args.max_skipped_steps, self.args.collapse_steps
        if not record["skipped"]:
            self.last_finite = {k: record[k] for k in ("step", "reward", "loss", "grad_norm", "kl",
                                                       "entropy")}
        if 0 < max_skipped <= self.skipped_in_a_row:
            last = (f"last finite metrics: {json.dumps(self.last_finite)}" if self.last_finite
                    else "no step with finite metrics in this run")
            raise SystemExit(
                f"grpo.py stopped at step {record['step']}: {self.skipped_in_a_row} optimizer steps in a "
                f"row skipped for a non-finite loss or gradient norm ({record['skip_reason']}); {last}. "
                f"Lower --learning_rate, or resume from an earlier checkpoint.")
        collapsed = record["format_rate"] == 0 and record["zero_advantage_groups"] == 1
        self.collapsed_in_a_row = self.collapsed_in_a_row + 1 if collapsed else 0
        if collapse_steps > 0 and self.collapsed_in_a_row >= 10 * collapse_steps:
            raise SystemExit(
                f"grpo.py stopped at step {record['step']}: for {self.collapsed_in_a_row} steps in a row "
                f"(10 x --collapse_steps {collapse_steps}) no completion had the answer format and every "
                f"group's rewards were equal: the policy has collapsed (entropy {record['entropy']}). "
                f"Lower --learning_rate and resume from a checkpoint from before step "
                f"{record['step'] - self.collapsed_in_a_row + 1}, or start over.")
        if 0 < collapse_steps == self.collapsed_in_a_row:
            return (f"warning: step {record['step']}: for {collapse_steps} steps in a row no "
                    f"completion had the answer format and every group's rewards were equal (all "
                    f"advantages 0, nothing to learn from): the policy has likely collapsed (entropy "
                    f"{record['entropy']}). Lower --learning_rate, or resume from an earlier checkpoint.")
        return None


@contextlib.contextmanager
def named_sampling_failure(step: int, model, learning_rate: float):
    """Why generate found no finite probabilities at `step` (torch.multinomial's "probability tensor
    contains inf/nan": the updates diverged): a SystemExit naming the weights the updates left,
    instead of a traceback from inside generate."""
    try:
        yield
    except RuntimeError as err:
        if "probability tensor contains" not in str(err):
            raise
        weights = [p.detach() for p in model.parameters()]
        nonfinite = sum(int((~w.isfinite()).sum()) for w in weights)
        largest = max(float(w.abs().max()) for w in weights if w.numel())
        policy = "the starting model (--model)" if step == 1 else f"the policy after step {step - 1}"
        cause = (f"{nonfinite} of its weights are not finite" if nonfinite else
                 f"its weights are finite but reach |w| = {largest:.3g}, and its activations overflow")
        raise SystemExit(
            f"grpo.py stopped at step {step}: sampling failed ({err}): {policy} gives non-finite "
            f"probabilities; {cause}. The updates diverged: lower --learning_rate (now {learning_rate:g}) "
            f"and start over, or resume from an earlier checkpoint.") from None


# ---------------------------------------------------------------------------------------------
# 8. How a run ends: stop signals, named errors (docs/method.md section 10)
# ---------------------------------------------------------------------------------------------

# The exit status of a run that a stop signal ended after saving: EX_TEMPFAIL ("try again later"),
# distinct from 0 (done) and 1 (an error), so a job script can requeue on it.
STOPPED = 75
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # what Slurm and Kubernetes send before they pre-empt a job
_stop = {"signal": None}
TRACEBACK = "MEDVLT_TRACEBACK"  # set to 1: named errors show their traceback too
# The errors a stage raises on purpose, each naming its file, row, flag or path.
NAMED_ERRORS = (reward.RowError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                PermissionError, SaveFailed)


def catch_stop_signals() -> None:
    """From now on SIGTERM and SIGUSR1 set a flag that the run reads between steps (`stop_requested`)
    instead of killing the process mid-step."""
    import signal

    def remember(signum, frame):
        _stop["signal"] = signal.Signals(signum).name

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), remember)


def stop_requested(accelerator=None) -> str | None:
    """The stop signal any process has received, or None. With `accelerator`, all processes agree
    (one all-reduce), so that they all stop after the same step; without, this process's own."""
    got = _stop["signal"]
    if accelerator is not None and accelerator.num_processes > 1:
        flags = torch.tensor([got == name for name in STOP_SIGNALS], dtype=torch.float,
                             device=accelerator.device)
        flags = accelerator.reduce(flags, "sum")
        got = next((name for name, flag in zip(STOP_SIGNALS, flags.tolist()) if flag), None)
    return got


def stopped(accelerator, signal_name: str, step: int, saved: str) -> SystemExit:
    """The SystemExit (status STOPPED) of a run stopped by `signal_name` after `step`; `saved`: the
    checkpoint that holds that step."""
    accelerator.print(f"stopped by {signal_name} after step {step}: {saved} holds it; run the same "
                      "command with --resume latest to continue")
    return SystemExit(STOPPED)


def run_main(main) -> None:
    """A stage's command line: `main()` with the stop signals caught, and its named errors (a bad
    row, a wrong flag or path, a failed save) as one line on stderr with exit status 1 instead of a
    traceback; MEDVLT_TRACEBACK=1 shows the traceback. A start that fails before any result gives
    its run folder back (`release_failed_starts`)."""
    catch_stop_signals()
    try:
        main()
    except BaseException as err:
        if not (isinstance(err, SystemExit) and err.code in (0, None, STOPPED)):
            release_failed_starts()  # a run that stopped before any result leaves its folder free
        if isinstance(err, SystemExit) and isinstance(err.code, str):  # a refusal, with its message
            print(f"{os.path.basename(sys.argv[0])}: error: {err.code}", file=sys.stderr)
            raise SystemExit(1) from None
        if not isinstance(err, NAMED_ERRORS) or os.environ.get(TRACEBACK, "") not in ("", "0"):
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
