"""The toy world: a tiny Qwen2.5-VL and synthetic medical multiple-choice questions.

Nothing can be downloaded on a laptop without the hub, so every stage is built and tested here:
- `python toy.py model --out DIR --size tiny|small` saves a randomly initialised
  Qwen2_5_VLForConditionalGeneration with a byte-level BPE tokenizer trained on the toy corpus,
  the Qwen special tokens, the Qwen2.5-VL chat template and image processor, in the same layout as
  `Qwen/Qwen2.5-VL-3B-Instruct`: AutoProcessor / AutoModelForImageTextToText load either.
- `python toy.py data --out DIR` saves questions in the schema of DESIGN.md section 2.

Three families, two modalities (DESIGN.md section 10 says what a model this small can learn):
- `ToyHeartRate` (text): a vignette with a heart rate -> bradycardia / normal / tachycardia;
- `ToyFever` (text): a vignette with a body temperature -> hypothermia / normal / fever;
- `ToyLesion` (image): a synthetic chest radiograph with one opacity -> small / large. Two options,
  like the closed questions of PathVQA, SLAKE and VQA-RAD: with three, the hard cases are mostly the
  middle class, and RL on them squeezed every size estimate towards "medium" (measured; README).
Options keep one order per family: a model this small does not learn to look up a shuffled letter
in minutes. Values are drawn across the thresholds, so some questions sit right next to them.

Every row carries a teacher's reasoning trace. A `--wrong-trace-rate` share of them is wrong, more
often near the thresholds (an imperfect teacher believes a slightly shifted reference range), and
each wrong trace is internally consistent: the comparison it writes is true for the range it
states, and its finding follows. The `sft` split is that teacher's distillation without rejection
sampling: its `answer_label` is the teacher's conclusion (the gold letter is kept in `gold_label`),
so the SFT'd model inherits the teacher's errors and RL has something to fix. The `train`,
`validation` and `test` splits carry gold labels only.
"""

import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# The synthetic questions
# ---------------------------------------------------------------------------------------------

# name: (modality, value range, thresholds, findings in option order, near-threshold band)
FAMILIES = {
    "ToyHeartRate": ("text", (35, 135), (60, 100), ("Bradycardia", "Normal heart rate", "Tachycardia"), 10),
    "ToyFever": ("text", (33.0, 41.0), (35.0, 38.0), ("Hypothermia", "Normal temperature", "Fever"), 0.8),
    "ToyLesion": ("image", (2.0, 15.0), (8.5,), ("Small lesion", "Large lesion"), 2.0),
}
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
    out: str = field(metadata={"help": "Folder for the DatasetDict (save_to_disk)."})
    n_sft: int = field(default=3000, metadata={"help": "Rows of teacher traces for SFT."})
    n_train: int = field(default=3000, metadata={"help": "Rows for pass counts and RL."})
    n_validation: int = field(default=600, metadata={"help": "Rows for choosing settings."})
    n_test: int = field(default=600, metadata={"help": "Held-out rows (the toy benchmarks)."})
    seed: int = 0
    wrong_trace_rate: float = field(default=0.35, metadata={"help": "Share of wrong traces."})


def draw_value(rng, family: str) -> float:
    lo, hi = FAMILIES[family][1]
    if family == "ToyHeartRate":
        return int(rng.integers(lo, hi + 1))  # bpm
    return round(float(rng.uniform(lo, hi)), 1)  # degrees C, or the lesion's radius in px


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


def question_text(family: str, value: float, rng) -> str:
    age, who = AGES[int(rng.integers(len(AGES)))], PATIENTS[int(rng.integers(2))]
    complaint = COMPLAINTS[int(rng.integers(len(COMPLAINTS)))]
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


def wrong_thresholds(family: str, value: float, rng):
    """The imperfect teacher: the reference limit nearest the value moves just past it.

    The finding then flips to the neighbouring class, and the trace stays true to the range it states.
    """
    thresholds, band = FAMILIES[family][2], FAMILIES[family][4]
    nearest = min(range(len(thresholds)), key=lambda k: abs(value - thresholds[k]))
    limit = thresholds[nearest]
    step = band * float(rng.uniform(0.2, 1.0))
    step = max(1, round(step)) if family == "ToyHeartRate" else max(0.1, round(step, 1))
    # classify() puts the low limit in the middle class and the high limit in the middle class too.
    below = value < limit if nearest == 0 else value <= limit
    shifted = list(thresholds)
    moved = value - step if below else value + step
    shifted[nearest] = int(moved) if family == "ToyHeartRate" else round(moved, 1)
    assert classify(value, shifted) != classify(value, thresholds)
    return tuple(shifted)


def make_rows(n: int, rng, start_index: int, wrong_rate: float) -> dict:
    """n rows, families in turn, as columns; a `wrong_rate` share with a wrong teacher trace."""
    families = [list(FAMILIES)[i % len(FAMILIES)] for i in range(n)]
    values = [draw_value(rng, f) for f in families]
    near = np.array([min(abs(v - t) for t in FAMILIES[f][2]) <= FAMILIES[f][4]
                     for f, v in zip(families, values)])
    # A wrong trace is 20 times as likely near a threshold as elsewhere: with the default rate,
    # about 70% of the traces near a threshold are wrong and 3-4% elsewhere. Near a threshold the
    # SFT'd model then answers wrongly when greedy but rightly in a fair share of its samples:
    # that is the room RL has (DESIGN.md section 10 measured too little of it at 50-60% / 10%).
    weights = np.where(near, 20.0, 1.0)
    n_wrong = round(wrong_rate * n)
    wrong = np.zeros(n, dtype=bool)
    if n_wrong:
        wrong[rng.choice(n, size=n_wrong, replace=False, p=weights / weights.sum())] = True
    cols = {k: [] for k in ("images", "question", "options", "answer_label", "answer", "reasoning",
                            "dataset_name", "dataset_index", "value", "gold_label", "teacher_label")}
    for i, (family, value) in enumerate(zip(families, values)):
        modality, _, thresholds, findings, _ = FAMILIES[family]
        gold = classify(value, thresholds)
        teacher_thresholds = wrong_thresholds(family, value, rng) if wrong[i] else thresholds
        teacher = classify(value, teacher_thresholds)
        cols["images"].append([radiograph(value, rng)] if modality == "image" else None)
        cols["question"].append(question_text(family, value, rng))
        cols["options"].append(json.dumps(dict(zip(LETTERS, findings))))
        cols["answer_label"].append(LETTERS[gold])
        cols["answer"].append(findings[gold])
        cols["reasoning"].append(trace_text(family, value, teacher_thresholds))
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
        cols = make_rows(n, rng, start, args.wrong_trace_rate if name == "sft" else 0.0)
        if name == "sft":
            cols = teacher_labelled(cols)
        splits[name] = datasets.Dataset.from_dict(cols, features=features)
        start += n
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------
# The tiny Qwen2.5-VL
# ---------------------------------------------------------------------------------------------

# Qwen2.5-VL's special tokens, in the order of the real vocabulary's tail.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The Qwen2-VL / Qwen2.5-VL chat template (the default system message included).
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
}
VOCAB_SIZE = 1024


@dataclass
class ModelArgs:
    out: str = field(metadata={"help": "Folder for the model + processor (save_pretrained)."})
    size: str = field(default="tiny", metadata={"help": "tiny (tests) or small (demo)."})
    seed: int = 0


def toy_corpus(seed: int = 0) -> list[str]:
    """Texts the tokenizer is trained on: prompts, targets and the chat template's own words."""
    import reward

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


def build_model(args: ModelArgs):
    import torch
    from transformers import (
        GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer(args.seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # Images of 56 x 56 px stay as they are: 4 x 4 patches, 4 tokens after the 2 x 2 merge.
    pixels = dict(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=4 * IMAGE_SIZE * IMAGE_SIZE)
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
        patch_size=14, temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]})
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)

    hidden, layers, heads, kv_heads, mlp, mrope = SIZES[args.size]["text"]
    depth, v_hidden, v_heads, v_mlp = SIZES[args.size]["vision"]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
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
    # The end-of-turn token ends generation, as in the released Instruct checkpoints.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
    )
    return model, processor


def main(argv=None):
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("model", "data"):
        raise SystemExit("usage: python toy.py model|data --out DIR [options]")
    if argv[0] == "model":
        (args,) = HfArgumentParser(ModelArgs).parse_args_into_dataclasses(argv[1:])
        if args.size not in SIZES:
            raise SystemExit(f"--size must be one of {list(SIZES)}, got {args.size!r}")
        model, processor = build_model(args)
        model.save_pretrained(args.out)
        processor.save_pretrained(args.out)
        n = sum(p.numel() for p in model.parameters())
        print(f"saved a {args.size} Qwen2.5-VL ({n / 1e6:.2f}M parameters) to {args.out}")
    else:
        (args,) = HfArgumentParser(DataArgs).parse_args_into_dataclasses(argv[1:])
        data = build_data(args)
        data.save_to_disk(args.out)
        print(f"saved toy data to {args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in data.items()))


if __name__ == "__main__":
    main()
