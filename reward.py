"""The task contract shared by every stage: prompt, row check, answer extraction, grading, reward.

MedVLThinker (arXiv 2508.02669) poses every question as multiple choice and trains with a
verifiable, binary reward on the answer letter. This module is the single definition of that task.
Importing it loads no torch, so curation and regrading stay light. docs/method.md sections 2-4. Its
last two sections are not the task: the run plumbing both trainers need word for word (precision,
FSDP, saving, timing, resuming) and the shared-prompt sampler of grpo.py and evaluate.py, kept here
so that the scripts share one module; those functions import torch when they are called.

The official code grades with three different rules, each in its own file, and all three matter:
    reward(s, l, a)        training reward          train/my_reward.py
    extract_answer(s)      evaluation (the tables)  analysis/regrade_eval_results.py
    pass_correct(s, l, a)  pass counts, traces      eval/run_offline_inference.py
They share one equality test, is_correct. Each function below returns exactly what the official one
does (tests/test_reward.py checks them on a table of hand-worked cases and on random strings). The
patterns that can backtrack quadratically on long adversarial completions (100 kB of unclosed
tags takes seconds, and a reward is computed for every sample of every RL step) are written as
string scans with the same results; the others are the official patterns themselves.
"""

import hashlib
import io
import json
import os
import re

# The official instruction, character for character. It was a Python raw string in the official
# code, so "\n" below is a backslash followed by "n", not a newline. The released checkpoints were
# trained on exactly these characters, so we keep them (docs/method.md section 3).
INSTRUCTION = (
    r"You will solve a problem/request. You should provide your thoughts within <think> </think> "
    r"tags before providing the answer.\nWrite your final answer within <answer> </answer> tags."
)

# The evaluation fallbacks of regrade_eval_results.py, tried in this order; the first pattern with
# any match wins, and its LAST match is taken. No DOTALL: "(.*)" stops at "\n" (not at "\r"), so
# "answer: A answer: B" gives "A answer: B". Each is linear: a match never backtracks.
ANSWER_MARKERS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"answer:\s*(.*)\s*", r"answer is:\s*(.*)\s*", r"answer is\s*(.*)\s*", r"is:\s*(.*)\s*"))
_FIRST_LINE = re.compile(r"\s*([^\n\r]+)")  # "\r" ends a line here, unlike in the markers above
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_WHITESPACE = re.compile(r"\s*")

# Tokens a policy must never sample: a vision special in a completion breaks the next forward pass
# ("Image features and image tokens do not match"), and a new turn is not an answer. Generation
# suppresses them and the training log-softmax masks the same ids (docs/method.md section 9).
NEVER_GENERATE = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                  "<|video_pad|>", "<|im_start|>")


def never_generate_ids(tokenizer) -> list[int]:
    """The ids of NEVER_GENERATE that this tokenizer has: one list for the sampler's suppression
    (evaluate.py, grpo.py) and the training log-softmax's mask (grpo.py), so the two always agree."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in NEVER_GENERATE if token in vocab]


def generation_kwargs(temperature: float, top_p: float, max_new_tokens: int, never_ids: list[int]) -> dict:
    """`generate` settings, every one explicit (docs/method.md section 9); temperature 0 = greedy.

    generate() fills a setting left unset from the checkpoint's generation_config.json, and the
    Qwen2.5-VL checkpoints ship near-greedy defaults and a repetition penalty; with do_sample=True
    transformers would also apply top_k=50. The paper's sampler used none of these: softmax(logits /
    T) cut by top_p, which is also what grpo.py's log-prob pass computes. `never_ids` are suppressed
    (never_generate_ids), as the training log-softmax masks them.
    """
    common = dict(max_new_tokens=max_new_tokens, repetition_penalty=1.0, suppress_tokens=never_ids)
    if temperature > 0:
        return dict(common, do_sample=True, temperature=temperature, top_k=0, top_p=top_p, min_p=None)
    return dict(common, do_sample=False, num_beams=1, temperature=None, top_k=None, top_p=None)


def sampling_seed(*keys) -> int:
    """The sampler's seed for one generate call, a function of what it samples, never of when or where.

    evaluate.py keys it by (--seed, dataset_name, dataset_index) of a batch's first row, grpo.py by
    (--seed, step, the call's first prompt position in the step). Samples then depend neither on the
    number of processes nor on what ran before, so a resumed run samples what the whole run would
    have (an addition to the paper, which did not fix sampling seeds). 63 bits of sha256.
    """
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------
# 1. Rows: the schema, checked once before any model work (docs/method.md section 2)
# ---------------------------------------------------------------------------------------------

# Columns every stage reads; `images` and `reasoning` may be absent (text-only set, no traces).
SCHEMA_COLUMNS = ("question", "options", "answer_label", "answer", "dataset_name", "dataset_index")
# Qwen2.5-VL's image processor refuses an aspect ratio over 200 (its smart_resize raises).
MAX_ASPECT_RATIO = 200


class RowError(ValueError):
    """A schema row that cannot become a prompt; the message names the row."""


def row_name(row) -> str:
    return f"row dataset_name={row.get('dataset_name')!r} dataset_index={row.get('dataset_index')!r}"


def parse_options(row) -> dict:
    """The `options` column (a JSON object letter -> text) as a dict, validated with the label."""
    try:
        options = json.loads(row["options"]) if isinstance(row["options"], str) else row["options"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise RowError(f"{row_name(row)}: options is not valid JSON ({err})") from None
    if not isinstance(options, dict) or not options:
        raise RowError(f"{row_name(row)}: options must be a non-empty JSON object letter -> text")
    for letter, text in options.items():
        if not isinstance(letter, str) or not isinstance(text, str) or not letter.strip():
            raise RowError(f"{row_name(row)}: option {letter!r}: {text!r} is not letter -> text")
    if row.get("answer_label") not in options:
        raise RowError(
            f"{row_name(row)}: answer_label {row.get('answer_label')!r} is not one of the option "
            f"letters {list(options)}"
        )
    return options


def open_image(item, base_dir: str = ""):
    """A schema image as a fully decoded RGB PIL image.

    An image may be a PIL image, the {"bytes", "path"} dict of datasets' Image feature, or a file
    path; a relative path is read relative to `base_dir` (the data file's folder), then to the
    working directory. Decoding every pixel here makes a truncated file fail now, not mid-run.
    """
    from PIL import Image

    if item is None:
        raise ValueError("an image is missing (None)")
    if isinstance(item, dict):
        item = io.BytesIO(item["bytes"]) if item.get("bytes") else item.get("path")
    if isinstance(item, str):
        candidates = [item] if os.path.isabs(item) else [os.path.join(base_dir, item), item]
        found = next((path for path in candidates if os.path.isfile(path)), None)
        if found is None:
            raise ValueError(f"image file not found: {item!r} (looked in {base_dir or '.'!r} and .)")
        item = found
    try:
        image = item if isinstance(item, Image.Image) else Image.open(item)
        image = image.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... name them all alike
        raise ValueError(f"image cannot be decoded ({type(err).__name__}: {err})") from None
    width, height = image.size
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {width}x{height} px: aspect ratio over {MAX_ASPECT_RATIO}, "
                         f"which Qwen2.5-VL's image processor refuses")
    return image


def check_row(row, base_dir: str = "") -> dict:
    """The row with its images decoded, or a RowError naming the row and what is wrong.

    The rules: `question` a non-empty string; `options` a JSON object letter -> text holding
    `answer_label`; `answer` the text of the labelled option (after stripping both: a mismatch
    makes the grader accept the wrong option's text and reject the right one); every image
    decodable, with an aspect ratio the processor accepts. Returns a copy: `images` becomes a list
    of RGB images, or None for a text-only row.
    """
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RowError(f"{row_name(row)}: question must be a non-empty string, got {question!r}")
    options = parse_options(row)
    answer = row.get("answer")
    label = row["answer_label"]
    if not isinstance(answer, str) or answer.strip() != options[label].strip():
        raise RowError(f"{row_name(row)}: answer {answer!r} is not the text of option {label} "
                       f"({options[label]!r})")
    try:
        images = [open_image(item, base_dir) for item in row.get("images") or []]
    except ValueError as err:
        raise RowError(f"{row_name(row)}: {err}") from None
    return dict(row, images=images or None)


def check_rows(dataset, on_bad_row: str = "error", base_dir: str = "", progress=None, extra_check=None):
    """Check every row once (check_row), before any model work: a long run never dies on row 40,000.

    Returns (positions of the good rows, the bad rows as {"position", "dataset_name",
    "dataset_index", "reason"}). With on_bad_row="error" any bad row raises one RowError that
    lists them. Duplicate (dataset_name, dataset_index) keys are bad rows too: they join
    predictions, rollouts and pass counts. `extra_check(row)` adds a stage's own rule (a reason, or
    None). Rows are read as Arrow, so images arrive undecoded ({"bytes", "path"}: datasets would
    raise its own error, naming no row) and nothing is cached next to the data; open_image decodes
    them, and only the verdict is kept.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"--on_bad_row must be error or skip, got {on_bad_row!r}")
    good, bad, seen = [], [], set()
    batches = dataset.with_format("arrow").iter(batch_size=64)
    rows = (row for batch in batches for row in batch.to_pylist())
    for i, row in enumerate(progress(rows, total=len(dataset)) if progress else rows):
        try:
            check_row(row, base_dir)
            if extra_check is not None and (reason := extra_check(row)):
                raise RowError(f"{row_name(row)}: {reason}")
            key = (row["dataset_name"], row["dataset_index"])
            if key in seen:
                raise RowError(f"{row_name(row)}: occurs twice; (dataset_name, dataset_index) must "
                               f"be unique")
            seen.add(key)
            good.append(i)
        except RowError as err:
            bad.append({"position": i, "dataset_name": row.get("dataset_name"),
                        "dataset_index": row.get("dataset_index"), "reason": str(err)})
    if bad and on_bad_row == "error":
        listed = "\n".join(b["reason"] for b in bad[:20])
        more = f"\n... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise RowError(f"{len(bad)} bad row(s) of {len(dataset)}; fix them, or pass --on_bad_row skip "
                       f"to skip them (they are then listed in bad_rows.jsonl):\n{listed}{more}")
    return good, bad


def write_bad_rows(bad: list[dict], output_dir: str) -> None:
    """The skipped rows, one JSON line each, in the stage's output folder."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "bad_rows.jsonl"), "w", encoding="utf-8") as f:
        for item in bad:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# 2. The prompt and the SFT target (docs/method.md section 3)
# ---------------------------------------------------------------------------------------------


def build_prompt_text(row) -> str:
    """User text: instruction, question, then one option per paragraph."""
    options = parse_options(row)
    text = f"{INSTRUCTION}\n\nQuestion: {row['question']}\n\nOptions:"
    for letter, option in options.items():
        text += f"\n\n{letter}. {option}"
    return text


def build_messages(row) -> list[dict]:
    """Chat messages for one schema row: a single user turn, images first, then the text.

    No system message of our own: the Qwen2.5-VL chat template adds its default one, as it did for
    the released checkpoints. Image items carry no payload; the images go to the processor.
    """
    images = row.get("images") or []
    content = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": build_prompt_text(row)})
    return [{"role": "user", "content": content}]


def sft_target(reasoning: str, answer_label: str) -> str:
    """The assistant turn of SFT; both parts stripped, as convert_trl_format_for_vlm.py does."""
    return f"<think> {reasoning.strip()} </think>\n<answer> {answer_label.strip()} </answer>"


# ---------------------------------------------------------------------------------------------
# 3. Grading: one equality test, three ways to find the answer (docs/method.md section 4)
# ---------------------------------------------------------------------------------------------


def is_correct(pred: str, answer_label: str, answer: str) -> bool:
    """grade_answer of the official code: case-insensitive equality, after stripping, with
    "{label}. {answer}" (built from the unstripped parts, then stripped), the label, or the text."""
    pred = pred.strip().lower()
    return (pred == f"{answer_label}. {answer}".strip().lower()
            or pred == answer_label.strip().lower()
            or pred == answer.strip().lower())


def format_ok(completion: str) -> bool:
    """True when the completion fullmatches `<think>.*?</think>\\s*<answer>.*?</answer>` (DOTALL).

    Equivalent scan: the text starts with <think>, ends with </answer>, and the text strictly
    between those two holds `</think>`, optional whitespace, `<answer>` somewhere.
    """
    if len(completion) < len("<think>") + len("</answer>"):
        return False
    if not (completion.startswith("<think>") and completion.endswith("</answer>")):
        return False
    middle = completion[len("<think>") : len(completion) - len("</answer>")]
    at = middle.find("</think>")
    while at >= 0:
        after = _WHITESPACE.match(middle, at + len("</think>")).end()
        if middle.startswith("<answer>", after):
            return True
        # Whitespace runs of different candidates do not overlap, so the scan stays linear.
        at = middle.find("</think>", at + len("</think>"))
    return False


def _first_block(text: str, open_tag: str, close_tag: str) -> str | None:
    """`re.search(open_tag + "(.*?)" + close_tag, text, re.DOTALL).group(1)`, or None: the first
    opening tag that has a closing tag after it is the first one (if it has none, none has)."""
    open_at = text.find(open_tag)
    if open_at < 0:
        return None
    close_at = text.find(close_tag, open_at + len(open_tag))
    return None if close_at < 0 else text[open_at + len(open_tag) : close_at]


def _first_answer_one_line(text: str) -> str | None:
    """`re.search(r"<answer>(.*?)</answer>", text)` without DOTALL: `.` stops only at "\\n"."""
    for line in text.split("\n"):
        found = _first_block(line, "<answer>", "</answer>")
        if found is not None:
            return found
    return None


def _last_answer_block(text: str) -> str | None:
    """Last match of `re.finditer(r"<answer>(.*?)</answer>", text, re.DOTALL)`."""
    last, pos = None, 0
    while True:
        open_at = text.find("<answer>", pos)
        if open_at < 0:
            return last
        close_at = text.find("</answer>", open_at + len("<answer>"))
        if close_at < 0:
            return last
        last = text[open_at + len("<answer>") : close_at]
        pos = close_at + len("</answer>")


def reward(completion: str, answer_label: str, answer: str) -> float:
    """Training reward r in {0, 1} (train/my_reward.py): format, then the first answer block.

    An answer block spanning lines is not found (the official pattern has no DOTALL); the whole
    stripped completion is then compared, which fails for any well-formatted completion.
    """
    if not format_ok(completion):
        return 0.0
    found = _first_answer_one_line(completion)
    pred = found if found is not None else completion
    return 1.0 if is_correct(pred, answer_label, answer) else 0.0


def extract_answer(completion: str) -> str:
    """The evaluation rule behind the paper's tables (analysis/regrade_eval_results.py).

    1. the last <answer>...</answer> block (it may span lines), stripped, then its first line
       ("\\n" or "\\r" ends it);
    2. else the first of ANSWER_MARKERS that matches anywhere: the group of its last match (the
       rest of that line), stripped;
    3. else the whole text, stripped.
    Then the four tags are removed and the result stripped.
    """
    found = _last_answer_block(completion)
    if found is not None:
        found = found.strip()
        line = _FIRST_LINE.search(found)
        found = line.group(1).strip() if line else found
    else:
        for pattern in ANSWER_MARKERS:
            last = None
            for last in pattern.finditer(completion):
                pass
            if last is not None:
                found = last.group(1).strip()
                break
        else:
            found = completion.strip()
    for tag in TAGS:
        found = found.replace(tag, "")
    return found.strip()


def pass_correct(completion: str, answer_label: str, answer: str) -> bool:
    """The grade of the pass counts and of trace selection (eval/run_offline_inference.py): the
    first <answer>...</answer> block (DOTALL), stripped, else the whole stripped text; is_correct.
    No format check: a correct answer without a think block counts."""
    text = completion.strip()
    found = _first_block(text, "<answer>", "</answer>")
    return is_correct(found.strip() if found is not None else text, answer_label, answer)


def think_text(completion: str) -> str | None:
    """The reasoning of a completion: its first <think>...</think> block (DOTALL), stripped, or
    None without one (merge_pmc_vqa_cot.py's rule for distilled traces)."""
    found = _first_block(completion, "<think>", "</think>")
    return None if found is None else found.strip()


# ---------------------------------------------------------------------------------------------
# 4. Plumbing every stage needs in the same way: reading a split, prompts, the run folder.
# ---------------------------------------------------------------------------------------------


def load_split(data: str, split: str, columns=SCHEMA_COLUMNS):
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
    else:
        loaded = datasets.load_dataset(data, split=split)
    where = f"{data}" + (f" (split {split})" if split else "")
    if len(loaded) == 0:
        raise ValueError(f"{where}: the dataset is empty (no rows)")
    missing = [c for c in columns if c not in loaded.column_names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; the schema needs {list(columns)} "
                         f"(it has {loaded.column_names})")
    return loaded


def data_dir(data: str) -> str:
    """Where relative image paths of a data set are read from: a data file's folder, or the folder."""
    return data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))


def chat_prompts(processor, rows) -> tuple[list[str], list]:
    """Chat-formatted prompt texts (generation prompt added) and the flat list of their images.

    The processor is given only real images: a batch mixing image and text-only rows works.
    """
    texts = [processor.apply_chat_template(build_messages(row), add_generation_prompt=True,
                                           tokenize=False) for row in rows]
    images = [image for row in rows for image in (row.get("images") or [])]
    return texts, images


def parse_args(args_class, argv=None):
    """The stage's argument dataclass from the command line, TRL-style: a YAML or JSON file as the
    first argument gives values (`python grpo.py configs/grpo_3b_m23k.yaml`), and flags after it
    override them (`... --learning_rate 2e-6`). transformers' HfArgumentParser does the parsing;
    the file's values become the parser's defaults, so a flag always wins and a field the file
    sets is no longer required on the command line. An unknown key in the file is an error."""
    import sys

    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(args_class)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = argv.pop(0)
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                values = json.load(f)
            else:
                import yaml

                values = yaml.safe_load(f) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"{path}: unknown setting(s) {unknown} for {args_class.__name__}")
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    (args,) = parser.parse_args_into_dataclasses(argv)
    return args


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


RUN_FILE = "run.json"


def claim_output_dir(output_dir: str, fingerprint: dict, resume: bool) -> None:
    """Make `output_dir` this run's folder, or refuse, saying how to go on.

    `fingerprint` names what makes a run this run (the stage, the settings that change its results,
    the input data's fingerprint). It is written to run.json in a new or empty folder. A folder of
    another run (different fingerprint, or files but no run.json) is never written into; a folder of
    this very run is continued only with `resume` (evaluate.py always resumes: its predictions are
    reused). Nothing already computed is ever overwritten or silently mixed.
    """
    path = os.path.join(output_dir, RUN_FILE)
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))  # as stored
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint)
                             if previous.get(k) != fingerprint.get(k))
            settings = fingerprint.get("settings", {}), previous.get("settings", {})
            detail = sorted(k for k in set(settings[0]) | set(settings[1])
                            if settings[0].get(k) != settings[1].get(k))
            raise SystemExit(
                f"{output_dir} holds another run ({', '.join(changed)} differ"
                + (f": {', '.join(detail)}" if detail else "") + "). Choose another --output_dir, "
                f"or delete {output_dir} to start over.")
        if not resume:
            raise SystemExit(f"{output_dir} holds this run already. Pass --resume latest to continue "
                             f"it, or delete {output_dir} to start over.")
        return
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise SystemExit(f"{output_dir} is not empty and is not a run folder of this project (no "
                         f"{RUN_FILE}). Choose another --output_dir, or empty it.")
    os.makedirs(output_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(fingerprint, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def data_fingerprint(dataset) -> str:
    """datasets' fingerprint of the loaded split: it changes when the files behind it change. Image
    files referenced by path are not part of it: replacing one under the same name goes unseen."""
    return dataset._fingerprint


# ---------------------------------------------------------------------------------------------
# 5. Plumbing shared by the trainers (sft.py, grpo.py): precision, FSDP, saving, timing, memory,
#    resuming. Only the trainers call it, and each function imports torch itself, so `import reward`
#    stays light. A reader of the task may skip it.
# ---------------------------------------------------------------------------------------------


def precision(mixed_precision: str) -> str:
    """accelerate's mixed_precision for --mixed_precision: auto is bf16 on a GPU, no (fp32) on a CPU."""
    import torch

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
    import torch

    choices = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if save_dtype == "auto":
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    if save_dtype not in choices:
        raise ValueError(f"--save_dtype must be auto, bfloat16 or float32, got {save_dtype!r}")
    return choices[save_dtype]


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
    import torch

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
    import dataclasses

    import torch
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type != DistributedType.FSDP or plugin is None \
            or plugin.mixed_precision_policy is None:
        return
    extra = {"output_dtype": None} if accelerator.is_fsdp2 else {"buffer_dtype": torch.float32}
    plugin.mixed_precision_policy = dataclasses.replace(plugin.mixed_precision_policy,
                                                        reduce_dtype=torch.float32, **extra)


def save_model(accelerator, model, processor, folder: str, dtype) -> None:
    """The model and processor as a save_pretrained folder whose weights and config.json are `dtype`
    (a torch dtype, `saved_dtype`), so that from_pretrained (dtype "auto") loads it in that dtype, as
    it loads a hub checkpoint.

    Every process joins get_state_dict (FSDP gathers the shards); the main one writes. A tied output
    layer (the 3B's) must be one tensor for save_pretrained to store it once; FSDP's gathered state
    dict holds two equal copies, so the tie is restored first. Tensors that share storage are
    converted once, so they still share it.
    """
    import copy

    import torch

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


def synced_time(device) -> float:
    """time.perf_counter() once the GPU has finished what was queued: CUDA kernels run
    asynchronously, so without the synchronize a step's (or a phase's) time would stop before its
    last kernels."""
    import time

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_gb(device) -> float:
    """Peak GPU memory allocated by torch; on CPU, the peak resident memory of the process (neither
    torch nor accelerate has one call that covers both devices)."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports kB


def remove_stale_tmp(output_dir: str) -> None:
    """Delete the .tmp folders of saves a killed run never finished (checkpoint-N.tmp, final.tmp):
    a save is written to such a folder and renamed when complete (docs/method.md section 10)."""
    import shutil

    for name in os.listdir(output_dir):
        if re.fullmatch(r"(checkpoint-\d+|final)\.tmp", name):
            shutil.rmtree(os.path.join(output_dir, name))


def keep_metrics_until(metrics_path: str, step: int) -> None:
    """Keep the metrics.jsonl lines of steps up to `step` (the resumed checkpoint's): the ones a
    stopped run logged after its last checkpoint are computed again, and a line torn by a kill
    mid-write (not a JSON object) is dropped. Rewritten via a .tmp file and os.replace, so a kill now
    loses nothing. No file yet: nothing to do (the first logged line makes it)."""
    import math

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
    with open(metrics_path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(metrics_path + ".tmp", metrics_path)


# ---------------------------------------------------------------------------------------------
# 6. Sampling n completions of a prompt from one prefill (grpo.py's rollouts with --share_prompt,
#    evaluate.py's samples with --share_prompt). Imports torch when called, as section 5.
# ---------------------------------------------------------------------------------------------


def generation_positions(model, inputs):
    """The [4, n, P] positions `generate` builds for Qwen2.5-VL (transformers 5,
    `_prepare_position_ids_for_generation`): row 0 the text positions (attention-mask cumsum, pads 0),
    rows 1-3 the 3-D rotary positions (`get_rope_index` with an image in the batch, else row 0)."""
    import torch

    mask = inputs["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if inputs.get("image_grid_thw") is not None:
        rope, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    else:
        rope = text.unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text.unsqueeze(0), rope], 0)


def generate_shared(model, inputs, group_size: int, **gen_kwargs):
    """`model.generate` on `inputs` with every prompt repeated group_size times, each prompt prefilled
    once: the n distinct prompts run once (all but their last token, image included) into a
    DynamicCache, which is repeated G times (`batch_repeat_interleave`); generate then finds P - 1
    tokens cached and runs only the last prompt token, n G x 1, and samples as usual.

    `inputs`: the processor's output for the n prompts, left padded. Returns sequences [n G, P + new]
    in the plain call's order (rows i G .. i G + G - 1 for prompt i). The positions are passed (the
    4 rows generate itself would build): otherwise generate would add the model's `rope_deltas`,
    which the prefill left with n rows, not n G. The sampler draws from [n G, vocab] probabilities
    at every step, as in the plain call, so a seed gives the same samples (tests/test_shared_prompt.py:
    token for token, text, image and mixed prompts), unless a rounding difference of ~1e-7 in a
    probability moves a draw across a boundary. `model` is the unwrapped model in eval mode.
    What it saves: the prompt's forward (and the vision tower on its image) G - 1 times; the KV
    cache is G x P as in the plain call (repeated after the prefill).
    """
    import torch
    from transformers import DynamicCache

    G, ids, mask = group_size, inputs["input_ids"], inputs["attention_mask"]
    if not bool(mask[:, -1].all()):
        raise ValueError("generate_shared needs left-padded prompts: the last column must be every "
                         "prompt's last token")
    mm = inputs.get("mm_token_type_ids")
    mm = torch.zeros_like(ids) if mm is None else mm
    positions = generation_positions(model, inputs)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], mm_token_type_ids=mm[:, :-1],
              position_ids=positions[..., :-1], pixel_values=inputs.get("pixel_values"),
              image_grid_thw=inputs.get("image_grid_thw"), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        cache.batch_repeat_interleave(G)
        return model.generate(input_ids=ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0),
                              mm_token_type_ids=mm.repeat_interleave(G, 0),
                              position_ids=positions.repeat_interleave(G, 1), past_key_values=cache,
                              **gen_kwargs)
