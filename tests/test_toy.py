"""The toy world loads like the real one and its data follows the schema of DESIGN.md section 2."""

import filecmp
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import reward
import toy

SCHEMA = {
    "images": datasets.List(datasets.Image()), "question": datasets.Value("string"),
    "options": datasets.Value("string"), "answer_label": datasets.Value("string"),
    "answer": datasets.Value("string"), "reasoning": datasets.Value("string"),
    "dataset_name": datasets.Value("string"), "dataset_index": datasets.Value("int64"),
}


def test_tiny_model_loads_like_a_hub_checkpoint_and_generates_mixed_batches(tiny_model_dir, toy_data_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    tok = processor.tokenizer
    # Special tokens are single ids; end of turn ends generation, as in the Instruct checkpoints.
    for special in toy.SPECIAL_TOKENS:
        assert len(tok(special)["input_ids"]) == 1
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"),
                                                    tok.convert_tokens_to_ids("<|endoftext|>")]
    # Never-generated ids: every one of reward.NEVER_GENERATE, as the tokenizer numbers it.
    assert reward.never_generate_ids(tok) == [tok.convert_tokens_to_ids(t) for t in reward.NEVER_GENERATE]
    assert len(set(reward.never_generate_ids(tok))) == len(reward.NEVER_GENERATE) == 6
    # Qwen2's pre-tokenizer splits numbers into single digits.
    assert tok.convert_ids_to_tokens(tok("137")["input_ids"]) == ["1", "3", "7"]

    test = datasets.load_from_disk(toy_data_dir)["test"]
    with_image = next(r for r in test if r["images"])
    text_only = next(r for r in test if not r["images"])
    prompt = processor.apply_chat_template(reward.build_messages(text_only), add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")

    processor.tokenizer.padding_side = "left"
    for rows in ([with_image, text_only], [text_only, text_only], [with_image, with_image]):
        texts = [processor.apply_chat_template(reward.build_messages(r), add_generation_prompt=True,
                                               tokenize=False) for r in rows]
        images = [img for r in rows for img in (r["images"] or [])]
        batch = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        if images:  # 56 x 56 px -> a 4 x 4 patch grid -> 4 image tokens after the 2 x 2 merge
            assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * len(images)
            assert (batch["input_ids"] == model.config.image_token_id).sum() == 4 * len(images)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        assert out.shape[0] == len(rows) and out.shape[1] > batch["input_ids"].shape[1]


def test_toy_data_schema_and_prompts(toy_data_dir):
    data = datasets.load_from_disk(toy_data_dir)
    assert set(data) == {"sft", "train", "validation", "test"}
    indices = []
    for name, split in data.items():
        for column, feature in SCHEMA.items():
            assert split.features[column] == feature, (name, column)
        for row in split:
            messages = reward.build_messages(row)
            n_images = sum(item["type"] == "image" for item in messages[0]["content"])
            assert n_images == len(row["images"] or [])
            options = json.loads(row["options"])
            assert options[row["answer_label"]] == row["answer"]
            indices.append(row["dataset_index"])
    assert len(indices) == len(set(indices)), "dataset_index must be unique across splits"
    assert set(data["test"]["dataset_name"]) == set(toy.FAMILIES)
    # Image questions have an image, text questions none.
    for row in data["test"]:
        assert bool(row["images"]) == (toy.FAMILIES[row["dataset_name"]][0] == "image")


def test_same_seed_gives_byte_identical_data(tmp_path):
    args = dict(n_sft=12, n_train=9, n_validation=6, n_test=6, seed=3)
    for name in ("a", "b"):
        toy.build_data(toy.DataArgs(out="", **args)).save_to_disk(str(tmp_path / name))
    arrows = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.arrow"))
    assert arrows
    for rel in arrows:
        assert filecmp.cmp(tmp_path / "a" / rel, tmp_path / "b" / rel, shallow=False), rel
    other = toy.build_data(toy.DataArgs(out="", **dict(args, seed=4)))
    assert other["test"]["question"] != datasets.load_from_disk(str(tmp_path / "a"))["test"]["question"]


def test_classify_thresholds_by_hand():
    assert [toy.classify(v, (60, 100)) for v in (59, 60, 100, 101)] == [0, 1, 1, 2]
    assert [toy.classify(v, (35.0, 38.0)) for v in (34.9, 35.0, 38.0, 38.1)] == [0, 1, 1, 2]
    assert [toy.classify(v, (8.5,)) for v in (8.4, 8.5, 15.0)] == [0, 1, 1]


def test_wrong_traces_share_placement_and_consistency():
    rng = np.random.default_rng(0)
    cols = toy.teacher_labelled(toy.make_rows(3000, rng, 0, 0.25))
    wrong = np.array(cols["answer_label"]) != np.array(cols["gold_label"])
    assert wrong.sum() == 750  # exactly the asked share
    near = np.array([min(abs(v - t) for t in toy.FAMILIES[f][2]) <= toy.FAMILIES[f][4]
                     for f, v in zip(cols["dataset_name"], cols["value"])])
    # Concentrated near the thresholds: wrong there about half the time, about 10% elsewhere.
    assert wrong[near].mean() > 0.4 and wrong[~near].mean() < 0.2
    for i in range(3000):
        # Internally consistent: the finding the trace ends with is the option of its label.
        finding = json.loads(cols["options"][i])[cols["answer_label"][i]].lower()
        assert cols["reasoning"][i].endswith(f"{finding}."), cols["reasoning"][i]
        assert cols["answer"][i] == json.loads(cols["options"][i])[cols["answer_label"][i]]
    gold = toy.make_rows(30, np.random.default_rng(1), 0, 0.0)
    assert gold["answer_label"] == gold["gold_label"] == gold["teacher_label"]


def test_lesion_size_is_visible_in_the_image():
    rng = np.random.default_rng(0)
    brightness = {r: np.mean([np.asarray(toy.radiograph(r, rng)).mean() for _ in range(20)]) for r in (3, 8, 14)}
    assert brightness[3] < brightness[8] < brightness[14]


def test_unknown_tokenizer_flavour_is_refused():
    # `--tokenizer qwen` (the real vocabulary) is tested in tests/test_real_tokenizer.py.
    with pytest.raises(SystemExit, match="--tokenizer must be toy or qwen"):
        toy.build_model(toy.ModelArgs(out="", tokenizer="gpt2"))
