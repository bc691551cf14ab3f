"""The task contract shared by every stage: prompt, answer extraction, grading, reward.

MedVLThinker (arXiv 2508.02669) poses every question as multiple choice and trains with a
verifiable, binary reward on the answer letter. This module is the single definition of that
task. It imports no torch, so curation and regrading stay light. DESIGN.md sections 3-4.

The regular expressions of the official code are written here as plain string scans with the same
results: the naive patterns backtrack quadratically on long adversarial completions (100 kB of
repeated tags takes seconds), and a reward is computed for every sample of every RL step.
tests/test_reward.py checks each function against the naive regex on a table of hand cases.
"""

import json
import os
import re

# The official instruction, character for character. It was a Python raw string in the official
# code, so "\n" below is a backslash followed by "n", not a newline. The released checkpoints were
# trained on exactly these characters, so we keep them (DESIGN.md section 3).
INSTRUCTION = (
    r"You will solve a problem/request. You should provide your thoughts within <think> </think> "
    r"tags before providing the answer.\nWrite your final answer within <answer> </answer> tags."
)

# Markers of the evaluation fallback, tried in this order (DESIGN.md section 4). They are matched
# case-insensitively in the completion itself: str.lower() can change the length of a text
# ("İ" becomes two characters), so a position found in a lowered copy is not one in the original.
ANSWER_MARKERS = ("answer:", "answer is:", "answer is", "is:")
_MARKER_PATTERNS = tuple(re.compile(re.escape(marker), re.IGNORECASE) for marker in ANSWER_MARKERS)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_WHITESPACE = re.compile(r"\s*")


# Tokens a policy must never sample: a vision special in a completion breaks the next forward pass
# ("Image features and image tokens do not match"), and a new turn is not an answer. Generation
# suppresses them and the training log-softmax masks the same ids (DESIGN.md section 9).
NEVER_GENERATE = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                  "<|video_pad|>", "<|im_start|>")


def never_generate_ids(tokenizer) -> list[int]:
    """The ids of NEVER_GENERATE that this tokenizer has: one list for the sampler's suppression
    (evaluate.py, grpo.py) and the training log-softmax's mask (grpo.py), so the two always agree."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in NEVER_GENERATE if token in vocab]


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


def build_prompt_text(row) -> str:
    """User text of DESIGN.md section 3: instruction, question, then one option per paragraph."""
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
    """The assistant turn the model is fine-tuned on (DESIGN.md section 3)."""
    return f"<think> {reasoning} </think>\n<answer> {answer_label} </answer>"


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


def _first_answer_one_line(text: str) -> str | None:
    """`re.search(r"<answer>(.*?)</answer>", text)` without DOTALL: `.` stops only at "\\n"."""
    for line in text.split("\n"):
        open_at = line.find("<answer>")
        if open_at >= 0:
            close_at = line.find("</answer>", open_at + len("<answer>"))
            if close_at >= 0:
                return line[open_at + len("<answer>") : close_at]
    return None


def is_correct(pred: str, answer_label: str, answer: str) -> bool:
    """Case-insensitive equality with the letter, "{letter}. {answer}" or the answer text."""
    pred = pred.strip().lower()
    label, answer = answer_label.strip(), answer.strip()
    return pred in {label.lower(), f"{label}. {answer}".lower(), answer.lower()}


def reward(completion: str, answer_label: str, answer: str) -> float:
    """Training reward r in {0, 1} (DESIGN.md section 4): format, then the first answer block.

    An answer block spanning lines is not found (the official pattern has no DOTALL); the whole
    stripped completion is then compared, which fails for any well-formatted completion.
    """
    if not format_ok(completion):
        return 0.0
    found = _first_answer_one_line(completion)
    pred = found if found is not None else completion
    return 1.0 if is_correct(pred, answer_label, answer) else 0.0


def _last_answer_block(text: str) -> str | None:
    """Last match of `re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)`."""
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


def extract_answer(completion: str) -> str:
    """The evaluation rule behind the paper's tables (DESIGN.md section 4).

    1. the last <answer>...</answer> block (it may span lines), stripped, then its first line;
    2. else the text after the last "answer:", "answer is:", "answer is", "is:" (case-insensitive,
       first marker found wins), first line;
    3. else the whole text; leftover tags are then removed and the result stripped.
    """
    found = _last_answer_block(completion)
    if found is None:
        for pattern in _MARKER_PATTERNS:
            last = None
            for last in pattern.finditer(completion):  # no marker overlaps itself: last = rightmost
                pass
            if last is not None:
                found = completion[last.end() :]
                break
    if found is None:
        found = completion
    found = found.strip().split("\n")[0]
    for tag in TAGS:
        found = found.replace(tag, "")
    return found.strip()


# ---------------------------------------------------------------------------------------------
# Plumbing every stage needs in the same way: reading a schema dataset, turning rows into prompts.
# ---------------------------------------------------------------------------------------------


def load_split(data: str, split: str):
    """A schema dataset from a `save_to_disk` folder, parquet/jsonl file(s), or a hub id."""
    import datasets

    if os.path.isdir(data) and any(os.path.exists(os.path.join(data, f))
                                   for f in ("dataset_dict.json", "state.json")):
        loaded = datasets.load_from_disk(data)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{data}: no split {split!r} (it has {list(loaded)})")
            return loaded[split]
        return loaded
    if data.endswith((".parquet", ".jsonl", ".json")):
        kind = "parquet" if data.endswith(".parquet") else "json"
        return datasets.load_dataset(kind, data_files=data, split="train")
    return datasets.load_dataset(data, split=split)


def chat_prompts(processor, rows) -> tuple[list[str], list]:
    """Chat-formatted prompt texts (generation prompt added) and the flat list of their images.

    The processor is given only real images: a batch mixing image and text-only rows works.
    """
    texts = [processor.apply_chat_template(build_messages(row), add_generation_prompt=True,
                                           tokenize=False) for row in rows]
    images = [image for row in rows for image in (row.get("images") or [])]
    return texts, images
