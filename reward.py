"""The task contract shared by every stage: prompt, row check, answer extraction, grading, reward.

MedVLThinker (arXiv 2508.02669) poses every question as multiple choice and trains with a
verifiable, binary reward on the answer letter. This module is the single definition of that task.
It imports no torch, transformers or accelerate, so curation and regrading stay light, and it
holds nothing but the task: the prompt, the row check, the grading rules, the reward, the sampling
settings and seeds (docs/method.md sections 2-4). The machinery that runs the task lives in
engine.py and runtime.py.

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


# How an image becomes the 8-bit RGB the processor takes, the same in every stage (docs/method.md
# section 10). 8-bit modes: PIL's own conversion, as the official code's `convert("RGB")` (a palette
# is looked up, grey is replicated, alpha is dropped). 16-bit, 32-bit and float grayscale (what a
# radiograph exported from DICOM is): PIL's conversion clips them at 255, so a 12-bit radiograph
# becomes white; they are windowed to their own value range instead, as a viewer without a VOI
# window does: 8-bit = round(255 (v - min) / (max - min)), a constant image 0. Other modes are refused.
EIGHT_BIT_MODES = ("1", "L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image):
    """An image of any handled mode as 8-bit RGB, by the rule above; ValueError otherwise."""
    import numpy as np
    from PIL import Image

    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"image of mode {image.mode} holds NaN or infinite values")
        low, high = values.min(), values.max()
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(np.rint(scaled).astype(np.uint8))
    elif image.mode not in EIGHT_BIT_MODES:
        raise ValueError(f"image mode {image.mode!r} is not handled (handled: {', '.join(EIGHT_BIT_MODES)}; "
                         f"{', '.join(WIDE_MODES)} windowed to their own range)")
    return image.convert("RGB")


def open_image(item, base_dir: str = ""):
    """A schema image as a fully decoded 8-bit RGB PIL image (`to_rgb`).

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
        image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... name them all alike
        raise ValueError(f"image cannot be decoded ({type(err).__name__}: {err})") from None
    image = to_rgb(image)
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


def chat_prompts(processor, rows) -> tuple[list[str], list]:
    """Chat-formatted prompt texts (generation prompt added) and the flat list of their images.

    The processor is given only real images: a batch mixing image and text-only rows works.
    """
    texts = [processor.apply_chat_template(build_messages(row), add_generation_prompt=True,
                                           tokenize=False) for row in rows]
    images = [image for row in rows for image in (row.get("images") or [])]
    return texts, images


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
