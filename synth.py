"""MedVLSynther's synthesis (arXiv 2510.25867; its generator-verifier pipeline): multiple-choice
questions made from biomedical figures by a generator, checked against a rubric by a verifier, and
selected (docs/method.md section 14).

    python synth.py generate --model zai-org/GLM-4.5V --data FIGURES --output_dir DIR/generated
    python synth.py verify --model Qwen/Qwen2.5-VL-72B-Instruct --data DIR/generated/generated.jsonl \
        --figures FIGURES --output_dir DIR/verified
    python synth.py select --data DIR/verified/verified.jsonl --figures FIGURES --output_dir DIR/selected
    python grpo.py --data DIR/selected/data ...       # or: make rl FILTER=0 TRAIN_DATA=DIR/selected/data

FIGURES is a data set (save_to_disk folder, parquet or jsonl, or a hub id) of figures as the
official pipeline prepares them from BIOMEDICA: `images` (a list), `caption` (one per image) and
`context` (the sentences of the paper that cite each image: a list of lists); `dataset_index` is
added when missing, as the official scripts do. `python toy.py figures` makes a toy one.

1. generate (the official synthesis/generate/*_generate.py): each figure's images,
   captions and citing sentences go into the generator's prompt (`generator_prompt`); its greedy
   answer is one JSON question {"question", "options": {"A".."E"}, "answer"}. The raw answer is kept
   in `generator_response`, beside the figure's fields, in DIR/generated.jsonl.
2. verify (verify/*_verify.py): the parsed question (`parse_json`, `mcq_of`), the
   images, the first caption and the citing sentences go into the verifier's prompt
   (`verifier_prompt`); it answers a rubric as JSON: 7 essential items of weight 5, 4-8 bonus items
   (3-4 or 1-2), pitfalls of -1 or -2. The raw answer is `verifier_response`, in DIR/verified.jsonl.
3. select (anotate_rubric_score.py, filter_by_score.py, rebalance_vqa.py,
   extract_vqa_subset_jsonl.py, construct_trainset.py): each rubric scored (`rubric_score`: the
   points earned minus the pitfalls' penalties over the points available, in [0, 1], and a pass only
   when every essential item earns its full weight), the questions kept that pass with a score of at
   least 0.9670, their answer letters rebalanced (`rebalance`), optionally a letter-balanced subset
   drawn (`draw_subset`, seed 42), and the rest written in the training schema (`training_row`).
   DIR/scored.jsonl holds every row with its question, score and pass, and why it was not kept.

Both model steps run the model through the project's engines (HF generate, or vLLM in one or
more processes, as evaluate.py), write as they go and resume after a stop. The prompts are the
official files' text, character for character, in prompts/. The quirks of the official code are
kept; each is named where it happens and listed in the README ("Synthesis").
"""

import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from operator import itemgetter
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

import engine
import reward
import runtime

STEPS = ("generate", "verify", "select")
PROMPTS = Path(__file__).resolve().parent / "prompts"


@dataclass
class Args:
    output_dir: str = field(metadata={"help": "The step's folder: its JSONL file (generate, verify) or "
                                              "scored.jsonl and data/ (select), with run.json."})
    data: str | None = field(default=None, metadata={
        "help": "generate: the figures (a save_to_disk folder, parquet/jsonl file or hub id with images, "
                "caption, context). verify: generate's generated.jsonl. select: verify's verified.jsonl."})
    figures: str | None = field(default=None, metadata={
        "help": "verify and select: the figures generate read (their images, joined on dataset_index)."})
    split: str = field(default="train", metadata={"help": "The split of the figures."})
    model: str | None = field(default=None, metadata={"help": "generate, verify: hub id or save_pretrained folder."})
    generator: Literal["glm", "qwen", "internvl", "glm_pmc"] = field(default="glm", metadata={
        "help": "generate: whose prompt, image rule and parsing: glm (glm_generate.py, the released "
                "MedSynVQA), qwen (qwen_generate.py), internvl (internvl_generate.py), glm_pmc "
                "(glm_generate_pmc.py: PMC-VQA-style, four options, no context)."})
    verifier: Literal["qwen", "glm"] = field(default="qwen", metadata={
        "help": "verify: whose prompt and image rule: qwen (qwen_verify.py, the released MedSynVQA) or "
                "glm (glm_verify.py)."})
    max_new_tokens: int = field(default=4096, metadata={
        "help": "The official scripts' --max_tokens (4096 in synthesis/scripts/, 2048 for glm_verify.sh)."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy, the official setting."})
    batch_size: int = field(default=16, metadata={"help": "Figures per generate call."})
    max_images: int = field(default=8, metadata={
        "help": "The official --max_images_per_prompt: verifiers and the InternVL generator see at most "
                "this many images of a figure."})
    min_image_side: int = field(default=28, metadata={
        "help": "GLM generator and verifier: an image whose short side is under this is left out "
                "(the official --small_image_policy skip)."})
    min_score: float = field(default=0.9670, metadata={
        "help": "select: keep a question whose rubric score is at least this (the released MedSynVQA: "
                "0.9670; filter_by_score.py's own default is 0.95)."})
    require_pass: bool = field(default=True, metadata={
        "help": "select: keep only questions that earn every essential item in full (the released "
                "MedSynVQA; filter_by_score.py's flag, off unless given there)."})
    verified: bool = field(default=True, metadata={
        "help": "select: False = no verifier (the no-verify and PMC-style sets): --data is generate's "
                "file and only the question's parse decides."})
    rebalance: bool = field(default=True, metadata={"help": "select: relabel options so answer letters are balanced."})
    subset: int | None = field(default=None, metadata={
        "help": "select: draw this many questions, balanced over the answer letters (1000, 2000, 5000, "
                "10000 for the released subsets)."})
    dataset_name: str = field(default="MedSynVQA", metadata={"help": "select: the dataset_name of the selected rows."})
    seed: int = field(default=42, metadata={
        "help": "The step's one random draw (official: 42 in every script): generate and verify sample with it "
                "when --temperature > 0; select draws the --subset with it."})
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata={
        "help": "A figure whose images cannot be read or whose prompt does not fit the model: stop and "
                "name it, or skip it and list it in bad_rows.jsonl."})
    dtype: str = field(default="auto", metadata={"help": "auto = bfloat16 on CUDA, float32 on CPU."})
    engine: Literal["hf", "vllm"] = field(default="hf", metadata={
        "help": "hf: transformers' generate. vllm: vLLM in this process (`make install-vllm`); under "
                "accelerate launch one engine per process, as evaluate.py."})
    vllm_memory: float = field(default=0.9, metadata={"help": "--engine vllm: gpu_memory_utilization."})
    tensor_parallel: int = field(default=1, metadata={
        "help": "--engine vllm in one process: GPUs per engine (the official tp_size: 8 for the 72B "
                "verifier, 4 for GLM-4.5V)."})


# ---------------------------------------------------------------------------------------------
# 1. The prompts (the official templates in prompts/, filled as the official code fills them)
# ---------------------------------------------------------------------------------------------


def template(name: str) -> str:
    # newline="": the files hold the official text exactly (the GLM verifier's first lines are joined
    # by runs of spaces, the PMC-style prompt has trailing spaces); the test hashes them.
    with open(PROMPTS / f"{name}.txt", encoding="utf-8", newline="") as f:
        return f.read()


# The official templates are raw strings: their \"\"\" is a backslash and a quote, three times,
# and the model reads it so. InternVL's generator uses Qwen's text.
GENERATOR_TEMPLATES = {"glm": "generate_glm", "qwen": "generate_qwen", "internvl": "generate_qwen",
                       "glm_pmc": "generate_glm_pmc"}
VERIFIER_TEMPLATES = {"qwen": "verify_qwen", "glm": "verify_glm"}


def join_captions(captions) -> str:
    """The generators' caption block: one "[Image i] caption" line per image ("(empty)" for a blank)."""
    if not captions:
        return "N/A"
    return "\n".join(f"[Image {i}] {(c or '').strip()}" if (c or "").strip() else f"[Image {i}] (empty)"
                     for i, c in enumerate(captions, start=1))


def join_contexts(contexts) -> str:
    """Every script's context block: per image, its citing sentences joined by spaces."""
    if not contexts:
        return "No additional context is provided."
    lines = []
    for i, sentences in enumerate(contexts, start=1):
        text = " ".join(s.strip() for s in sentences if s and s.strip()) if sentences else ""
        lines.append(f"[Image {i}] {text or '(empty)'}")
    return "\n".join(lines)


def first_caption(captions) -> str:
    """The verifiers' caption block. Quirk kept: only the first caption, even when a figure has
    several images (qwen_verify.py and glm_verify.py, join_captions)."""
    if not captions:
        return "Image(s) Public Caption: N/A"
    text = ((captions[0] if isinstance(captions, list) else captions) or "").strip()
    return f"Image(s) Public Caption: {text}" if text else "Image(s) Public Caption: N/A"


def generator_prompt(row: dict, generator: str) -> str:
    """The generator's user text for a figure (build_prompt_from_row of generate/*_generate.py).
    Filled by str.replace in this order, as there: a caption that holds "{CONTEXT_BLOCK}" is filled
    too. The PMC-style prompt has no context block."""
    text = template(GENERATOR_TEMPLATES[generator]).replace("{CAPTION_BLOCK}", join_captions(row.get("caption")))
    if generator == "glm_pmc":
        return text
    return text.replace("{CONTEXT_BLOCK}", join_contexts(row.get("context")))


def verifier_prompt(row: dict, mcq: dict | None, verifier: str) -> str | None:
    """The verifier's user text (build_prompt_from_row of verify/*_verify.py): the question as JSON
    (ensure_ascii=False), the first caption, the contexts; None when there is no question (the
    official code then records {"error": "missing_mcq"} and asks no model)."""
    if not mcq:
        return None
    return (template(VERIFIER_TEMPLATES[verifier]).replace("{MCQ_JSON}", json.dumps(mcq, ensure_ascii=False))
            .replace("{CAPTION_BLOCK}", first_caption(row.get("caption")))
            .replace("{CONTEXT_BLOCK}", join_contexts(row.get("context"))))


# Qwen's official scripts write the chat text by hand: a system turn of their own, the images, the
# text (an empty vision block when there is no image). GLM's and InternVL's use the model's chat
# template (GLM with thinking off).
QWEN_SYSTEM = {"generate": "You are a helpful assistant.", "verify": "You are a strict biomedical MCQ verifier."}


def chat_text(processor, family: str, step: str, prompt: str, n_images: int) -> str:
    """The prompt as the model reads it: for Qwen the official hand-written chat text; otherwise the
    processor's chat template, images first.

    Deviation: Qwen's official text puts every image pad of a figure inside ONE vision block;
    transformers' Qwen2.5-VL finds images by their vision-start tokens and fails on that ("shape
    mismatch" in get_rope_index), so each image gets its own block here, as Qwen2.5-VL's chat
    template writes it. A figure of one image (90% of the official curation) gets the official text.
    """
    if family == "qwen":
        vision = "<|vision_start|><|image_pad|><|vision_end|>" * n_images or "<|vision_start|><|vision_end|>"
        return (f"<|im_start|>system\n{QWEN_SYSTEM[step]}<|im_end|>\n<|im_start|>user\n{vision}{prompt}"
                "<|im_end|>\n<|im_start|>assistant\n")
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    # GLM-4.5V's template reads enable_thinking (off, as the official scripts set it); a template
    # that does not would take the flag for a processor setting.
    thinking = {"enable_thinking": False} if "enable_thinking" in (processor.chat_template or "") else {}
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False, **thinking)


def shown_images(images: list, family: str, step: str, args: Args) -> list:
    """The images the official script gives the model: the verifiers and InternVL's generator the
    first --max_images; GLM's generator and verifier leave out an image whose short side is under
    --min_image_side; Qwen's generator takes them all."""
    if step == "verify" or family == "internvl":
        images = images[: args.max_images]
    if family in ("glm", "glm_pmc"):
        images = [im for im in images if min(im.size) >= args.min_image_side]
    return images


# ---------------------------------------------------------------------------------------------
# 2. Reading the answers (the official parse_model_output, normalize_generated_vqa, anotate's score)
# ---------------------------------------------------------------------------------------------

ANSWER_AFTER_THINK = re.compile(r"(?is)<think>.*?</think>\s*<answer>(.*?)</answer>")
ANSWER_ONLY = re.compile(r"(?is)<answer>(.*?)</answer>")


def parse_json(text: str, strip_tags: bool = True):
    """The JSON object in a model's answer, or None (parse_model_output of every official script).

    strip_tags (the GLM generators, strip_reasoning_answer_tags): a <think>...</think><answer>...
    </answer> answer, or one with only <answer>...</answer>, is read inside the answer tags.
    Then: a leading ``` fence (``` or ```json) is cut at its closing fence; the text from the first
    "{" to the last "}" is parsed; if that fails, once more with curly double quotes and the right
    single quote made straight and commas before "}" or "]" dropped.
    """
    if not isinstance(text, str):
        return None
    if strip_tags and text:
        found = ANSWER_AFTER_THINK.search(text) or ANSWER_ONLY.search(text)
        if found:
            text = found.group(1).strip()
    s = text.strip()
    if s.startswith("```"):
        s = s[3:]
        if s.startswith("json"):
            # Official: "```json\n" loses "json"; "```json{" loses every leading j, s, o, n.
            s = s[4:] if len(s) >= 4 and s[3] == "\n" else s.lstrip("json").lstrip()
        end = s.find("```")
        if end != -1:
            s = s[:end].strip()
    start, end = s.find("{"), s.rfind("}")
    if start == -1 or end <= start:
        return None
    candidate = s[start : end + 1]
    try:
        return json.loads(candidate)
    except json.JSONDecodeError:
        cleaned = candidate.replace("\u201c", '"').replace("\u201d", '"').replace("\u2019", "'")
        cleaned = re.sub(r",\s*]", "]", re.sub(r",\s*}", "}", cleaned))
        try:
            return json.loads(cleaned)
        except json.JSONDecodeError:
            return None


LETTERS = ("A", "B", "C", "D", "E")


def mcq_of(parsed) -> dict | None:
    """A parsed question in the official shape {"question", "options": {"A".."E"}, "answer"}
    (combine_generated_MCQ_parquet.py, normalize_generated_vqa, then its Arrow column of strings):
    options A-E only, a missing one None, extra keys dropped, a non-string question or answer
    turned to a string. None for what is not an object, and for what the official step cannot store
    (options that are not an object, an option that is not a string, text that is not valid UTF-8):
    it stops the whole run there."""
    if not isinstance(parsed, dict):
        return None
    options = parsed.get("options") or {}
    if not isinstance(options, dict):
        return None
    options = {k: options.get(k) for k in LETTERS}
    if any(v is not None and not isinstance(v, str) for v in options.values()):
        return None
    as_text = lambda v: v if isinstance(v, str) or v is None else str(v)  # noqa: E731
    mcq = {"question": as_text(parsed.get("question")), "options": options, "answer": as_text(parsed.get("answer"))}
    texts = [mcq["question"], mcq["answer"], *options.values()]
    if any(t is not None and not t.isascii() and not encodable(t) for t in texts):
        return None  # a lone surrogate ("\ud83d" in the JSON): Arrow cannot store it as UTF-8
    return mcq


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


ESSENTIALS = ("Stem Self-contained", "Vocabulary Constraint", "Diagnosis Leak", "Single Correct Option",
              "Option Type Consistency", "Clinical Validity", "Image\u2013Text Consistency")


def as_int(value) -> int:
    """int(value), or 0 where int() fails: "5" is 5, 4.9 is 4, "5.0" and None are 0 (anotate_rubric_score.py)."""
    try:
        return int(value)
    except Exception:
        return 0


def rubric_problem(verification) -> str | None:
    """Why a parsed verifier answer gives no score (anotate_rubric_score.py writes None and no pass),
    or None: not an object holding a non-empty "rubric" list, or an answer with an "error" key. An
    item that is not an object stops the official script; here the answer gives no score either."""
    if verification is None:
        return "the verifier's answer holds no JSON object"
    if isinstance(verification, dict) and "error" in verification:
        return f"the verifier answered an error ({str(verification['error'])[:60]})"
    rubric = verification.get("rubric") if isinstance(verification, dict) else None
    if not isinstance(rubric, list) or not rubric:
        return "the verifier's JSON has no rubric list"
    if not all(isinstance(item, dict) for item in rubric):
        return "a rubric item is not an object (the official script stops there)"
    return None


def rubric_score(verification) -> tuple[float | None, bool]:
    """(verify_score, verify_pass) of a parsed verifier answer, as anotate_rubric_score.py writes
    them (--score_type normalized).

    score = clip((sum of the positive items' scores, each clipped to [0, weight]) - (sum of the
    pitfalls' negative scores, as penalties)) / (sum of the positive weights), 0, 1); pass = every
    one of the 7 essential titles present (case and outer spaces ignored; the last item of a title
    wins) with a positive weight and a score equal to it. An answer with an "error" key, without a
    rubric list, or with an empty one: (None, False). Items are read with int() (`as_int`): a weight
    of "5" counts, one of "5.0" is 0. An item that is not an object stops the official script; here
    it is (None, False).
    """
    if rubric_problem(verification):
        return None, False
    rubric = verification["rubric"]
    available = earned = penalty = 0
    for item in rubric:
        weight, score = as_int(item.get("weight", 0)), as_int(item.get("score", 0))
        if str(item.get("category", "")).strip().lower() == "pitfall":
            penalty += -score if score < 0 else 0
        elif weight > 0:
            available += weight
            earned += min(max(score, 0), weight)
    norm = None if available <= 0 else max(0.0, min(1.0, (earned - penalty) / available))
    by_title = {str(item.get("title", "")).strip().lower(): item for item in rubric
                if str(item.get("title", "")).strip()}
    passed = True
    for title in ESSENTIALS:
        item = by_title.get(title.lower())
        if item is None or not (as_int(item.get("weight", 0)) > 0
                                and as_int(item.get("score", 0)) == as_int(item.get("weight", 0))):
            passed = False
    return norm, passed


# ---------------------------------------------------------------------------------------------
# 3. Selection: filter, rebalance, subset, the training schema
# ---------------------------------------------------------------------------------------------


def relabelable(mcq, letters=LETTERS) -> bool:
    """rebalance_vqa.py's is_valid_gv: a string question, every letter's option a string, the answer one of them."""
    return (isinstance(mcq, dict) and isinstance(mcq.get("question"), str) and isinstance(mcq.get("options"), dict)
            and isinstance(mcq.get("answer"), str) and all(isinstance(mcq["options"].get(k), str) for k in letters)
            and mcq["answer"] in letters)


def balanced_counts(n: int, letters=LETTERS) -> dict:
    """n spread over the letters as evenly as possible, the remainder to the first letters."""
    return {k: n // len(letters) + (1 if i < n % len(letters) else 0) for i, k in enumerate(letters)}


def rebalance(records: list[dict], letters=LETTERS) -> list[dict]:
    """rebalance_vqa.py: in file order, each relabelable question's correct option moves to the
    letter furthest below its share of the relabelable questions (ties: the first letter); the other
    options keep their order in the remaining letters. Other rows pass through unchanged. The
    question becomes exactly {"question", "options", "answer"}."""
    targets = balanced_counts(sum(relabelable(r.get("generated_vqa"), letters) for r in records), letters)
    counts, out = Counter(), []
    for record in records:
        mcq = record.get("generated_vqa")
        if relabelable(mcq, letters):
            new = max(letters, key=lambda k: (targets[k] - counts[k], -letters.index(k)))
            old = mcq["answer"]
            # The old correct letter goes to the new one; the other old letters, in order, fill the
            # other new letters in order (build_mapping).
            source = dict(zip([new] + [k for k in letters if k != new], [old] + [k for k in letters if k != old]))
            options = {k: mcq["options"][source[k]] for k in letters}
            record = dict(record, generated_vqa={"question": mcq["question"], "options": options, "answer": new})
            counts[new] += 1
        out.append(record)
    return out


def drawable(mcq, letters=LETTERS) -> bool:
    """extract_vqa_subset_jsonl.py's is_valid_gv: like `relabelable`, but an option may be any value."""
    return (isinstance(mcq, dict) and isinstance(mcq.get("question"), str) and isinstance(mcq.get("options"), dict)
            and isinstance(mcq.get("answer"), str) and all(k in mcq["options"] for k in letters)
            and mcq["answer"] in letters)


def draw_subset(records: list[dict], k: int, seed: int = 42, letters=LETTERS) -> list[dict]:
    """extract_vqa_subset_jsonl.py: k questions, as many of each answer letter as balanced_counts
    says, drawn with Python's random seeded once: each letter's questions (in file order) shuffled
    and the first taken, letter by letter; then the subset shuffled. ValueError where the official
    script exits: k over the drawable questions, or a letter short."""
    rng = random.Random(seed)
    by_letter = {letter: [] for letter in letters}
    for record in records:
        if drawable(record.get("generated_vqa"), letters):
            by_letter[record["generated_vqa"]["answer"]].append(record)
    available = sum(len(v) for v in by_letter.values())
    if k < 0:
        raise ValueError(f"--subset {k}: must not be negative")
    if k > available:
        raise ValueError(f"--subset {k}: only {available} questions can be drawn")
    targets = balanced_counts(k, letters)
    for letter in letters:
        if targets[letter] > len(by_letter[letter]):
            raise ValueError(f"--subset {k}: needs {targets[letter]} questions answered {letter}, there are "
                             f"{len(by_letter[letter])}")
    subset = []
    for letter in letters:
        rng.shuffle(by_letter[letter])
        subset.extend(by_letter[letter][: targets[letter]])
    rng.shuffle(subset)
    return subset


def training_row(record: dict, images: list, dataset_name: str, letters=LETTERS) -> dict | None:
    """A selected question in the training schema (construct_trainset.py), or None where that
    script drops it: no string question or answer, or the answer not one of the letters. Quirk
    kept: a missing option of A-E becomes "" (a four-option question gets an empty E); an option
    beyond the letters that is None (the PMC-style set's unused E) is left out, where the official
    file writes null, which the row check refuses."""
    mcq = record.get("generated_vqa")
    if not drawable(mcq, letters):  # construct_trainset.py's check is the subset draw's
        return None
    options = {k: ("" if v is None else str(v)) if k in letters else v for k, v in mcq["options"].items()
               if k in letters or v is not None}
    return {"images": images, "question": mcq["question"], "options": json.dumps(options, ensure_ascii=False),
            "answer_label": mcq["answer"], "answer": options[mcq["answer"]], "reasoning": None,
            "dataset_name": dataset_name, "dataset_index": record["dataset_index"],
            "hash": record.get("hash") or "", "misc": ""}


# ---------------------------------------------------------------------------------------------
# 4. The model steps: one greedy answer per figure, written as it comes, resumed after a stop
# ---------------------------------------------------------------------------------------------

KEY = "dataset_index"
OUTPUT = {"generate": "generated", "verify": "verified"}  # OUTPUT_DIR/NAME.jsonl
RESPONSE = {"generate": "generator_response", "verify": "verifier_response"}
# What makes a step's folder this run (run.json): the settings that change what it writes.
STEP_SETTINGS = {
    "generate": ("generator", "max_new_tokens", "temperature", "batch_size", "max_images", "min_image_side",
                 "seed", "split", "on_bad_row", "dtype", "engine"),
    "verify": ("verifier", "max_new_tokens", "temperature", "batch_size", "max_images", "min_image_side", "seed",
               "split", "on_bad_row", "dtype", "engine"),
    "select": ("min_score", "require_pass", "verified", "rebalance", "subset", "seed", "dataset_name",
               "split", "generator"),
}


def load_figures(args: Args):
    """The figures, with `dataset_index` added as the official scripts add it (0, 1, ...) when missing;
    an index must name one figure."""
    import datasets

    source = args.figures or args.data
    figures = runtime.load_split(source, args.split, columns=("images", "caption"))
    # A caption string would be read one character per image, as the official scripts would read it.
    shapes = {"caption": "a list of strings (one per image)", "context": "a list of lists of strings (per image)"}
    for column, shape in shapes.items():
        feature, depth = figures.features.get(column), 1 if column == "caption" else 2
        for _ in range(depth if feature is not None else 0):
            if not isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
                raise ValueError(f"{source}: column {column!r} must be {shape}, it is {figures.features[column]}")
            feature = feature.feature
    if KEY not in figures.column_names:
        figures = figures.add_column(KEY, list(range(len(figures))))
    keys = figures[KEY]
    if len(set(keys)) != len(keys):
        repeated = next(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"{source}: dataset_index {repeated} names more than one figure")
    return figures


def figure_images(figures, position: int, base_dir: str) -> list:
    """A figure's images, decoded and checked (reward.open_image): a bad one is named, where the
    official scripts leave it out silently."""
    stored = figures.with_format("arrow")[position]["images"].to_pylist()[0] or []
    return [reward.open_image(item, base_dir) for item in stored]


def step_file(path: str, name: str) -> str:
    """The file a previous step wrote: PATH, or PATH/NAME.jsonl when PATH is its folder."""
    if Path(path).is_dir():
        path = str(Path(path) / f"{name}.jsonl")
    if not Path(path).is_file():
        hint = "; select --verified False reads generate's generated.jsonl" if name == "verified" else ""
        raise FileNotFoundError(f"{path}: no such file (the {name}.jsonl that synth.py's previous step writes{hint})")
    return path


def read_lines(path: str, needs: tuple[str, ...]) -> list[dict]:
    """A step's JSONL file; a line without a field the next step needs is named."""
    lines = []
    for number, line in runtime.read_jsonl(path, complete_only=False):
        missing = [k for k in needs if k not in line]
        if missing:
            raise ValueError(f"{path} line {number}: no {', '.join(missing)} (written by synth.py's previous step?)")
        lines.append(line)
    if not lines:
        raise ValueError(f"{path}: no lines")
    return lines


def user_texts(args: Args, step: str, figures, lines: list[dict] | None) -> list[dict]:
    """One work item per figure (generate) or per generated question (verify): its output line
    (the figure's fields but its images, or the input line), its figure's position, and the
    prompt's user text (None: nothing to ask, the line is written without a model call)."""
    items = []
    if step == "generate":
        stored = figures.remove_columns("images")
        for position, row in enumerate(stored):
            line = dict(row, generator=args.generator)
            items.append({"line": line, "position": position, "text": generator_prompt(row, args.generator)})
        return items
    position_of = {k: i for i, k in enumerate(figures[KEY])}
    for number, line in enumerate(lines, 1):
        if line[KEY] not in position_of:
            raise ValueError(f"{args.data} line {number}: dataset_index {line[KEY]!r} is not a figure of {args.figures}")
        mcq = mcq_of(parse_json(line["generator_response"], strip_tags=line["generator"] in ("glm", "glm_pmc")))
        items.append({"line": dict(line, verifier=args.verifier), "position": position_of[line[KEY]],
                      "text": verifier_prompt(line, mcq, args.verifier)})
    return items


def measure(args: Args, step: str, items: list[dict], figures, processor, show: bool) -> tuple[list, list]:
    """Each item's images (the official rule, `shown_images`), chat text and length in tokens,
    before any model work; a figure whose images cannot be read or whose prompt is longer than the
    model's context is named (--on_bad_row)."""
    family = args.generator if step == "generate" else args.verifier
    context, base_dir, bad = engine.context_length(args.model), runtime.data_dir(args.figures or args.data), []
    for item in tqdm(items, desc="measuring prompts", unit="figure", disable=not show):
        item["length"] = 0
        if item["text"] is None:
            continue
        name = f"figure dataset_index={item['line'][KEY]!r}"
        try:
            images = shown_images(figure_images(figures, item["position"], base_dir), family, step, args)
        except ValueError as err:
            bad.append({KEY: item["line"][KEY], "reason": f"{name}: {err}"})
            continue
        item["n_images"] = len(images)
        chat = chat_text(processor, family, step, item["text"], len(images))
        item["length"] = engine.prompt_length(processor, {"images": images}, text=chat)
        if item["length"] + args.max_new_tokens > context:
            bad.append({KEY: item["line"][KEY], "reason": f"{name}: prompt of {item['length']} tokens + "
                        f"{args.max_new_tokens} new ones is longer than the model's context ({context})"})
    if bad and args.on_bad_row == "error":
        raise reward.RowError(f"{len(bad)} bad figure(s); the first: {bad[0]['reason']} (--on_bad_row skip "
                              "skips them and lists them in bad_rows.jsonl)")
    skipped = {b[KEY] for b in bad}
    return [item for item in items if item["line"][KEY] not in skipped], bad


def answer(model, processor, args: Args, step: str, batch: list[dict], figures, eos_ids) -> list[str]:
    """The model's greedy (or sampled) answer to each item of a batch, decoded as evaluate.py does."""
    family = args.generator if step == "generate" else args.verifier
    base_dir = runtime.data_dir(args.figures or args.data)
    rows = [{"images": shown_images(figure_images(figures, item["position"], base_dir), family, step, args)}
            for item in batch]
    texts = [chat_text(processor, family, step, item["text"], len(row["images"])) for item, row in zip(batch, rows)]
    gen_kwargs = reward.generation_kwargs(args.temperature, 1.0, args.max_new_tokens,
                                          reward.never_generate_ids(processor.tokenizer))
    if args.engine == "vllm":
        seeds = [reward.sampling_seed(args.seed, item["line"][KEY]) if args.temperature > 0 else None for item in batch]
        ids = [ids for ids, _ in model.generate(processor, rows, 1, gen_kwargs, eos_ids, seeds, texts=texts)]
    else:
        torch.manual_seed(reward.sampling_seed(args.seed, batch[0]["line"][KEY]))
        with torch.no_grad():
            ids = engine.sample(model, processor, rows, 1, gen_kwargs, texts=texts)
    return processor.batch_decode(ids, skip_special_tokens=True)


def load_engine(args: Args, items: list[dict], state):
    """The model to answer with: HF's, or a vLLM engine sized for the longest prompt (an engine in every
    process under accelerate launch: vLLM makes its process groups when it starts)."""
    if args.engine == "vllm":
        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
        asked = [item for item in items if item["text"] is not None] or [{"length": 1, "n_images": 1}]
        return engine.VLLM(args.model, dtype, args.seed, max(i["length"] for i in asked) + args.max_new_tokens,
                           args.vllm_memory, max(max(i["n_images"] for i in asked), 1),
                           processes=state.num_processes, tensor_parallel=args.tensor_parallel)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if state.device.type == "cuda" else "float32")
    return AutoModelForImageTextToText.from_pretrained(args.model, dtype=getattr(torch, dtype)).to(state.device).eval()


def run_model_step(args: Args, step: str) -> Path:
    """generate or verify: every figure (or question) answered once, in fixed batches dealt to the
    processes, written as it comes and resumed after a stop (runtime.answer_lines); the lines
    then merged in input order into OUTPUT_DIR/generated.jsonl (verified.jsonl)."""
    out = Path(args.output_dir)
    state = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=48))])
    if args.tensor_parallel > 1 and state.num_processes > 1:
        raise SystemExit("--tensor_parallel runs one engine over several GPUs in one process: start it with "
                         "python, not accelerate launch")
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"
    figures = load_figures(args)
    lines = read_lines(args.data, (KEY, "generator", "generator_response")) if step == "verify" else None
    items, bad = measure(args, step, user_texts(args, step, figures, lines), figures, processor,
                         state.is_main_process)
    fingerprint = {"stage": f"synth {step}", "model": runtime.model_fingerprint(args.model),
                   "settings": {k: getattr(args, k) for k in STEP_SETTINGS[step]},
                   "data": runtime.data_fingerprint(figures) if step == "generate" else runtime.file_fingerprint(args.data)}
    if state.is_main_process:
        runtime.claim_output_dir(str(out), fingerprint, resume=True, inputs=(args.data, args.figures, args.model))
        if bad:
            runtime.write_bad_rows(bad, str(out))
            print(f"skipped {len(bad)} bad figure(s), listed in {out / 'bad_rows.jsonl'}; the first: {bad[0]['reason']}")
    state.wait_for_everyone()

    by_key, loaded = {item["line"][KEY]: item for item in items}, {}
    eos_ids = engine.end_of_turn_ids(args.model) if args.engine == "vllm" else None
    if args.engine == "vllm" and state.num_processes > 1:
        loaded["model"] = load_engine(args, items, state)

    def respond(batch: list[dict]) -> list[dict]:
        if "model" not in loaded:  # only a process with work loads the model
            loaded["model"] = load_engine(args, items, state)
        responses = answer(loaded["model"], processor, args, step, [by_key[line[KEY]] for line in batch], figures, eos_ids)
        return [{RESPONSE[step]: response} for response in responses]

    # A verify item without a question is written without asking the model (the official verifiers
    # record {"error": "missing_mcq"}).
    merged = runtime.answer_lines(state, out, OUTPUT[step], [dict(i["line"], **({} if i["text"] else {RESPONSE[step]: None}))
                                                             for i in items],
                                  [i["text"] is not None for i in items], args.batch_size, respond, itemgetter(KEY),
                                  show=state.is_main_process)
    if merged is not None:
        strip = step == "generate" and args.generator in ("glm", "glm_pmc")
        parsed = sum(parse_json(line[RESPONSE[step]], strip_tags=strip) is not None for line in merged)
        print(f"{step}: {len(merged)} lines in {out / OUTPUT[step]}.jsonl; {parsed} hold a JSON object")
    state.wait_for_everyone()
    runtime.release_output_dir(str(out))
    return out / f"{OUTPUT[step]}.jsonl"


# ---------------------------------------------------------------------------------------------
# 5. The select step: score, filter, rebalance, draw, write the training set
# ---------------------------------------------------------------------------------------------


def why_not_verified(verification, score, passed, args: Args) -> str | None:
    """Why filter_by_score.py drops a scored question (None: kept), in its order: no score, no
    pass (with --require_pass), a score under --min_score."""
    if score is None:
        return rubric_problem(verification) or "the rubric has no item of positive weight"
    if args.require_pass and not passed:
        return "an essential rubric item is missing or not earned in full"
    if score < args.min_score:
        return f"rubric score under --min_score {args.min_score}"
    return None


def score_lines(lines: list[dict], args: Args) -> list[tuple[dict, str | None]]:
    """Each line with its question (`generated_vqa`: the official shape, or None) and, verified,
    its `verify_score` and `verify_pass`; beside it why it is dropped (None: kept)."""
    scored = []
    for line in lines:
        generator = line.get("generator", args.generator)
        parsed = parse_json(line["generator_response"], strip_tags=generator in ("glm", "glm_pmc"))
        mcq = mcq_of(parsed)
        record = dict(line, generated_vqa=mcq)
        why = None
        if mcq is None:
            why = ("the generator's answer holds no JSON object" if parsed is None
                   else "the generator's JSON is not a question the official pipeline can store (options not an object of texts)")
        if args.verified:
            response = line.get("verifier_response")
            verification = parse_json(response, strip_tags=False) if response is not None else None
            score, passed = rubric_score(verification)
            record.update(verify_score=score, verify_pass=passed)
            if why is None:
                why = why_not_verified(verification, score, passed, args)
        scored.append((record, why))
    return scored


def select(args: Args) -> dict:
    """Score every line, keep what the filter passes, rebalance, draw, and write DIR/scored.jsonl,
    DIR/data (a DatasetDict with split "train" in the training schema) and DIR/select.json (the
    counts, by reason)."""
    import datasets

    out = Path(args.output_dir)
    needs = (KEY, "generator_response") + (("verifier_response",) if args.verified else ())
    lines = read_lines(args.data, needs)
    figures = load_figures(args)
    fingerprint = {"stage": "synth select", "settings": {k: getattr(args, k) for k in STEP_SETTINGS["select"]},
                   "data": runtime.file_fingerprint(args.data), "figures": runtime.data_fingerprint(figures)}
    # Deterministic: the same run may write its files again.
    runtime.claim_output_dir(str(out), fingerprint, resume=True, inputs=(args.data, args.figures))
    pmc = {line.get("generator", args.generator) for line in lines} == {"glm_pmc"}
    letters = LETTERS[:4] if pmc else LETTERS  # rebalance_vqa_pmc.py, extract_vqa_subset_jsonl_pmc.py: A-D

    scored = score_lines(lines, args)
    kept = [record for record, why in scored if why is None]
    why = {record[KEY]: reason for record, reason in scored}
    if args.rebalance:
        kept = rebalance(kept, letters)
    if args.subset is not None:
        drawn = draw_subset(kept, args.subset, args.seed, letters)
        chosen = {r[KEY] for r in drawn}
        for record in kept:
            if record[KEY] not in chosen:
                why[record[KEY]] = ("not drawn into the --subset" if drawable(record["generated_vqa"], letters)
                                    else "the question cannot be drawn (answer not one of the letters)")
        kept = drawn

    position_of = {k: i for i, k in enumerate(figures[KEY])}
    stored, base_dir, rows = figures.with_format("arrow"), runtime.data_dir(args.figures or args.data), []
    for record in kept:
        if record[KEY] not in position_of:
            raise ValueError(f"{args.data}: dataset_index {record[KEY]!r} is not a figure of {args.figures}")
        images = stored[position_of[record[KEY]]]["images"].to_pylist()[0] or []
        row = training_row(record, images, args.dataset_name, letters)
        if row is None:
            why[record[KEY]] = "no string question, or the answer is not one of the letters (construct_trainset.py)"
            continue
        try:
            reward.check_row(row, base_dir)
        except reward.RowError as err:  # training would refuse it (grpo.py's row check)
            why[record[KEY]] = f"fails the row check: {str(err).split(': ', 1)[-1]}"
            continue
        rows.append(row)
    final = {row[KEY]: row for row in rows}

    records = [dict(record, dropped=why[record[KEY]] if record[KEY] not in final else None) for record, _ in scored]
    runtime.write_lines(out / "scored.jsonl", records)
    features = datasets.Features({
        "images": datasets.List(datasets.Image()), "question": datasets.Value("string"),
        "options": datasets.Value("string"), "answer_label": datasets.Value("string"),
        "answer": datasets.Value("string"), "reasoning": datasets.Value("string"),
        "dataset_name": datasets.Value("string"), "dataset_index": datasets.Value("int64"),
        "hash": datasets.Value("string"), "misc": datasets.Value("string")})
    columns = {name: [row[name] for row in rows] for name in features}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(str(out / "data"))
    counts = Counter(r["dropped"] for r in records if r["dropped"] is not None)
    answers = Counter(row["answer_label"] for row in rows)
    summary = {"lines": len(records), "selected": len(rows), "dropped": dict(counts.most_common()),
               "answer_letters": {k: answers[k] for k in letters}}
    runtime.write_json(out / "select.json", summary)
    print(f"select: {len(rows)} of {len(records)} questions selected into {out / 'data'} (split train); "
          f"answer letters {summary['answer_letters']}")
    for reason, n in counts.most_common():
        print(f"  dropped {n}: {reason}")
    runtime.release_output_dir(str(out))
    return summary


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        print(f"usage: python synth.py {'|'.join(STEPS)} --output_dir DIR [options]\n\n{__doc__.strip()}\n\n"
              "Every flag and its default: python synth.py generate --help")
        return None
    step, argv = argv[0], argv[1:]
    if step not in STEPS:
        raise SystemExit(f"the first argument is the step: one of {', '.join(STEPS)} (got {step!r})")
    args = runtime.parse_args(Args, argv=argv)
    if not args.data:
        raise SystemExit(f"synth.py {step}: give --data ({Args.__dataclass_fields__['data'].metadata['help']})")
    if step != "generate" and not args.figures:
        raise SystemExit(f"synth.py {step}: give --figures, the figures generate read (their images)")
    if step != "generate":  # the previous step's file, or its folder
        args.data = step_file(args.data, OUTPUT["verify" if step == "select" and args.verified else "generate"])
    if step == "select":
        return select(args)
    if not args.model:
        raise SystemExit(f"synth.py {step}: give --model")
    runtime.refuse_below_one(args, ("batch_size", "max_new_tokens"))
    runtime.refuse_bad_sampling(args.temperature)
    if args.tensor_parallel < 1 or (args.tensor_parallel > 1 and args.engine != "vllm"):
        raise SystemExit("--tensor_parallel N > 1 splits a vLLM engine over N GPUs: it needs --engine vllm")
    if args.engine == "vllm":
        engine.check_vllm()
    runtime.check_model(args.model)
    return run_model_step(args, step)


if __name__ == "__main__":
    runtime.run_main(main)
