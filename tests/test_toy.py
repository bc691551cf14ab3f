"""The toy world loads like the real one and its data follows the schema of docs/method.md section 2."""

import filecmp
import json

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
        toy.build_data(toy.DataArgs(output_dir="", **args)).save_to_disk(str(tmp_path / name))
    arrows = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.arrow"))
    assert arrows
    for rel in arrows:
        assert filecmp.cmp(tmp_path / "a" / rel, tmp_path / "b" / rel, shallow=False), rel
    other = toy.build_data(toy.DataArgs(output_dir="", **dict(args, seed=4)))
    assert other["test"]["question"] != datasets.load_from_disk(str(tmp_path / "a"))["test"]["question"]


def test_classify_thresholds_by_hand():
    assert [toy.classify(v, (60, 100)) for v in (59, 60, 100, 101)] == [0, 1, 1, 2]
    assert [toy.classify(v, (35.0, 38.0)) for v in (34.9, 35.0, 38.0, 38.1)] == [0, 1, 1, 2]
    assert [toy.classify(v, (8.5,)) for v in (8.4, 8.5, 15.0)] == [0, 1, 1]


def sex(question: str) -> str:
    return "woman" if " woman " in question else "man"


def test_the_teachers_ranges_by_hand():
    # Every limit of a vital sign moved the same way for a woman (down) and the other way for a man
    # (up); lesions are sized right.
    assert set(toy.TEACHER_LIMITS) == {"ToyHeartRate", "ToyFever"}
    for family, shift in (("ToyHeartRate", 20), ("ToyFever", 1.5)):
        limits = toy.FAMILIES[family][2]
        assert toy.TEACHER_LIMITS[family]["woman"] == tuple(round(t - shift, 1) for t in limits)
        assert toy.TEACHER_LIMITS[family]["man"] == tuple(round(t + shift, 1) for t in limits)
    assert toy.teacher_range("ToyLesion", "woman") == toy.teacher_range("ToyLesion", "man") == (8.5,)
    # 57 bpm: bradycardia; the teacher's range for a woman (40 to 80) calls it normal, consistently.
    assert toy.trace_text("ToyHeartRate", 57, toy.teacher_range("ToyHeartRate", "woman")) == (
        "The normal range is 40 to 80 bpm. 57 is between 40 and 80, so this is normal heart rate.")
    assert [toy.disagree("ToyHeartRate", v, "woman") for v in (39, 40, 59, 60, 80, 81, 100, 101)] == [
        False, True, True, False, False, True, True, False]
    assert [toy.disagree("ToyHeartRate", v, "man") for v in (59, 60, 79, 80, 100, 101, 120, 121)] == [
        False, True, True, False, False, True, True, False]
    assert [toy.disagree("ToyFever", v, "woman") for v in (33.4, 33.5, 34.9, 35.0, 36.5, 36.6, 38.0, 38.1)] == [
        False, True, True, False, False, True, True, False]
    assert [toy.disagree("ToyFever", v, "man") for v in (34.9, 35.0, 36.4, 36.5, 38.0, 38.1, 39.5, 39.6)] == [
        False, True, True, False, False, True, True, False]
    assert not any(toy.disagree("ToyLesion", v, w) for v in (2.0, 5.0, 8.4, 8.5, 12.0) for w in ("woman", "man"))


def test_wrong_traces_share_placement_and_consistency():
    rng = np.random.default_rng(0)
    cols = toy.teacher_labelled(toy.make_rows(3000, rng, 0, 0.75))
    whos = [sex(q) for q in cols["question"]]
    families = np.array(cols["dataset_name"])
    text = families != "ToyLesion"
    true_range = np.array([r == toy.trace_text(f, int(v) if f == "ToyHeartRate" else v, toy.FAMILIES[f][2])
                           for f, v, r in zip(cols["dataset_name"], cols["value"], cols["reasoning"])])
    # round(0.75 x 3000) rows drawn at random quote the teacher's range; on a text row that is the
    # range for the patient's sex (1,500 expected of the 2,000), on a lesion row the true limit.
    assert 1400 < (~true_range).sum() < 1600 and true_range[~text].all()
    wrong = np.array(cols["answer_label"]) != np.array(cols["gold_label"])
    disagree = np.array([toy.disagree(f, v, w) for f, v, w in zip(cols["dataset_name"], cols["value"], whos)])
    assert (wrong == (disagree & ~true_range)).all()  # wrong exactly where a quoted range disagrees
    gold, teacher = np.array(cols["gold_label"]), np.array(cols["teacher_label"])
    for family in toy.TEACHER_LIMITS:
        rows = families == family
        assert 0.34 < disagree[rows].mean() < 0.43, family  # 40 of 101 bpm values, 30 of 80 tenths of a C
        assert 0.65 < wrong[rows & disagree].mean() < 0.85, family  # three in four of those traces
        # Wrong findings in every class and in every wrong letter: RL on them favours no letter.
        assert set(gold[rows & wrong]) == set(teacher[rows & wrong]) == set(toy.LETTERS), family
    assert not wrong[~text].any()
    for i in range(3000):
        # Internally consistent: the finding the trace ends with is the option of its label, and the
        # trace is the teacher's text for the range it states (the true one, or the one for the sex).
        finding = json.loads(cols["options"][i])[cols["answer_label"][i]].lower()
        assert cols["reasoning"][i].endswith(f"{finding}."), cols["reasoning"][i]
        assert cols["answer"][i] == json.loads(cols["options"][i])[cols["answer_label"][i]]
        family, value = cols["dataset_name"][i], cols["value"][i]
        value = int(value) if family == "ToyHeartRate" else value  # the column is float64; bpm are whole
        limits = toy.FAMILIES[family][2] if true_range[i] else toy.teacher_range(family, whos[i])
        assert cols["reasoning"][i] == toy.trace_text(family, value, limits)
    gold_rows = toy.make_rows(30, np.random.default_rng(1), 0, 0.0)
    assert gold_rows["answer_label"] == gold_rows["gold_label"] == gold_rows["teacher_label"]


def test_lesion_size_is_visible_in_the_image():
    rng = np.random.default_rng(0)
    brightness = {r: np.mean([np.asarray(toy.radiograph(r, rng)).mean() for _ in range(20)]) for r in (3, 8, 14)}
    assert brightness[3] < brightness[8] < brightness[14]


def test_unknown_tokenizer_flavour_is_refused():
    # `--tokenizer qwen` (the real vocabulary) is tested in tests/test_real_tokenizer.py.
    with pytest.raises(SystemExit, match="--tokenizer must be toy or qwen"):
        toy.build_model(toy.ModelArgs(output_dir="", tokenizer="gpt2"))


def test_lesion_radii_keep_clear_of_the_limit():
    rng = np.random.default_rng(0)
    radii = np.array([toy.draw_value(rng, "ToyLesion") for _ in range(5000)])
    (limit,) = toy.FAMILIES["ToyLesion"][2]
    assert radii.min() >= 2.0 and radii.max() <= 15.0
    assert (np.abs(radii - limit) >= toy.LESION_MARGIN).all()
    assert 0.45 < (radii < limit).mean() < 0.55  # both findings about equally often


@pytest.mark.parametrize("argv, message", [
    (["data", "--n_train", "-3"], "--n_train -3 must be 1 or more"),  # unchecked: numpy's "negative dimensions"
    (["data", "--n_test", "0"], "--n_test 0 must be 1 or more"),
    (["figures", "--n", "0"], "--n 0 must be 1 or more"),
])
def test_a_split_or_figure_count_below_one_is_refused(argv, message, tmp_path):
    with pytest.raises(ValueError, match=f"^{message}$"):
        toy.main([argv[0], "--output_dir", str(tmp_path / "out"), *argv[1:]])
    assert not (tmp_path / "out").exists()
