"""sft.py: the label mask, the token-normalised loss under accumulation and data parallelism, resume.

docs/method.md section 6: loss on the assistant turn only (its end-of-turn token included),
normalised by the number of label tokens of the whole optimizer step. Section 10: every bad row a
named error or a counted skip, before any model work; the checkpoint contract; nothing written into
the input or into another run's folder.
"""

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

import reward
import runtime
import sft
from conftest import ROOT, run_env


# The end of the SFT target: the toy model's generation_config names <|im_end|> first, as Qwen2.5-VL's
# does (test_the_end_of_turn_comes_from_the_generation_config).
EOT = "<|im_end|>"


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run_sft(model, data, out, *flags):
    """One in-process run of sft.main on the toy `sft` split (saves a Python start per run)."""
    sft.main(["--model", model, "--data", data, "--split", "sft", "--output_dir", str(out),
              "--learning_rate", "3e-3", *map(str, flags)])


def snapshot(folder) -> dict:
    """Every file under `folder` with its size and modification time: equal snapshots, untouched."""
    return {os.path.relpath(os.path.join(d, f), folder): (os.stat(os.path.join(d, f)).st_size,
                                                          os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files}


def toy_rows(toy_data_dir, n: int) -> tuple[list[dict], datasets.Features]:
    """The first n rows of the toy `sft` split as plain dicts (images as {"bytes", "path"})."""
    split = datasets.load_from_disk(toy_data_dir)["sft"]
    return split.select(range(n)).to_list(), split.features


def with_image_files(rows: list[dict], folder: Path) -> list[dict]:
    """The rows with every image written to folder/images/ and given as a path relative to folder,
    as a jsonl or parquet file in `folder` holds them."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for row in rows:
        paths = []
        for k, image in enumerate(row["images"] or []):
            paths.append(f"images/{row['dataset_index']}-{k}.png")
            (folder / paths[-1]).write_bytes(image["bytes"])
        out.append(dict(row, images=paths or None))
    return out


def write_rows(rows: list[dict], path: Path, features=None) -> str:
    """rows as a save_to_disk folder (with the toy features), a .jsonl or a .parquet file."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)
    # from_dict, not from_list: an empty from_list has no columns at all, not zero rows of them.
    dataset = datasets.Dataset.from_dict({k: [row[k] for row in rows] for k in features or rows[0]},
                                         features=features)
    dataset.to_parquet(str(path)) if path.suffix == ".parquet" else dataset.save_to_disk(str(path))
    return str(path)


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_label_mask_is_exactly_the_assistant_turn(tiny_model_dir, toy_data_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "right"
    tok = processor.tokenizer
    text_row = dict(question="The heart rate is 48 bpm. How is it best described?",
                    options=json.dumps({"A": "Bradycardia", "B": "Normal heart rate", "C": "Tachycardia"}),
                    answer_label="A", answer="Bradycardia", reasoning="\n 48 is below 60, so bradycardia.\n",
                    images=None, dataset_name="Hand", dataset_index=0)
    # The trace is stripped, as the official conversion script does (reward.sft_target).
    target = "<think> 48 is below 60, so bradycardia. </think>\n<answer> A </answer><|im_end|>"

    # The text is the template's rendering of the whole conversation, minus the "\n" after <|im_end|>.
    prompts, fulls, _ = sft.sft_texts(processor, [text_row], EOT)
    conversation = reward.build_messages(text_row) + [
        {"role": "assistant", "content": [{"type": "text", "text": target[:-len("<|im_end|>")]}]}]
    assert fulls[0] + "\n" == processor.apply_chat_template(conversation, tokenize=False)
    assert fulls[0] == prompts[0] + target and prompts[0].endswith("<|im_start|>assistant\n")

    # By hand: the prompt's tokens, then the assistant's tokens; labels only on the latter.
    prompt_ids = tok(prompts[0])["input_ids"]
    assistant_ids = tok(target)["input_ids"]
    assert tok.convert_ids_to_tokens(assistant_ids[-3:]) == ["answer", ">", "<|im_end|>"]
    batch = sft.tokenize(processor, [text_row], EOT)
    assert batch["input_ids"][0].tolist() == prompt_ids + assistant_ids
    assert batch["labels"][0].tolist() == [sft.IGNORE] * len(prompt_ids) + assistant_ids

    # An image row in a mixed, right-padded batch: its 4 image tokens are prompt, the padding of the
    # shorter row is ignored, and each row's labels equal those it gets alone.
    image_row = next(r for r in datasets.load_from_disk(toy_data_dir)["sft"] if r["images"])
    alone = sft.tokenize(processor, [image_row], EOT)
    mixed = sft.tokenize(processor, [image_row, text_row], EOT)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (alone["input_ids"] == image_id).sum() == 4
    labelled = alone["labels"][0] != sft.IGNORE
    assert not labelled[alone["input_ids"][0] == image_id].any()
    image_target = reward.sft_target(image_row["reasoning"], image_row["answer_label"]) + "<|im_end|>"
    assert alone["labels"][0][labelled].tolist() == tok(image_target)["input_ids"]
    assert labelled.nonzero().min() == len(alone["input_ids"][0]) - len(tok(image_target)["input_ids"])
    for i, single in ((0, alone), (1, batch)):
        n = single["labels"].shape[1]
        assert mixed["labels"][i, :n].tolist() == single["labels"][0].tolist()
        assert (mixed["labels"][i, n:] == sft.IGNORE).all()

    # A row without a trace is an error that names it.
    with pytest.raises(reward.RowError, match="dataset_name='Hand' dataset_index=0.*no reasoning"):
        sft.tokenize(processor, [dict(text_row, reasoning=None)], EOT)


def test_the_end_of_turn_comes_from_the_generation_config(tiny_model_dir):
    """The SFT target ends with the first end-of-sequence id of generation_config (grpo.py cuts
    completions at the same ids): <|im_end|>, the token the chat template closes a turn with."""
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    config = GenerationConfig.from_pretrained(tiny_model_dir)
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert sft.end_of_turn(config, tokenizer) == EOT
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert sft.end_of_turn(GenerationConfig(eos_token_id=endoftext), tokenizer) == "<|endoftext|>"
    with pytest.raises(ValueError, match="no eos_token_id"):
        sft.end_of_turn(GenerationConfig(), tokenizer)


def test_too_long_sequences_are_dropped_and_counted(tiny_model_dir, toy_data_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rows = datasets.load_from_disk(toy_data_dir)["sft"]
    lengths = [int(sft.tokenize(processor, [r], EOT)["attention_mask"].sum()) for r in rows]
    limit = sorted(lengths)[len(lengths) // 2]
    args = sft.Args(model=tiny_model_dir, data=toy_data_dir, split="sft", max_length=limit)
    kept, kept_lengths, dropped = sft.prepare_data(args, rows, processor, EOT, Accelerator(cpu=True))
    assert dropped == sum(n > limit for n in lengths) > 0
    assert sorted(kept["dataset_index"]) == [r["dataset_index"] for r, n in zip(rows, lengths) if n <= limit]
    assert kept_lengths == [n for n in lengths if n <= limit]  # whole sequences, never cut


def test_one_step_gradient_does_not_depend_on_micro_batching(tiny_model_dir, toy_data_dir):
    """Micro-batches of 3 + 1 + 4 rows give the gradient of one batch of 8 with the mean token loss.

    The reference is the model's own loss (transformers' mean over label tokens), one forward.
    """
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "right"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [datasets.load_from_disk(toy_data_dir)["sft"][i] for i in range(8)]
    assert any(r["images"] for r in rows[:3]) and not any(r["images"] for r in rows[3:4])

    whole = sft.tokenize(processor, rows, EOT)
    reference = model(**whole).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    micro_batches = [sft.tokenize(processor, rows[a:b], EOT) for a, b in ((0, 3), (3, 4), (4, 8))]
    loss = sft.accumulate_gradients(model, micro_batches, Accelerator(cpu=True))
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)

    # Gradient checkpointing recomputes activations: the same gradient.
    checkpointed, _ = sft.load_model(sft.Args(data="-", model=tiny_model_dir, gradient_checkpointing=True))
    checkpointed.train()
    assert checkpointed.is_activation_checkpointing
    sft.accumulate_gradients(checkpointed, micro_batches, Accelerator(cpu=True))
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)

    # The usual mistake, a mean of per-micro-batch means, is a different number here (one short
    # micro-batch of a single row weighs as much as seven rows).
    uneven = [sft.tokenize(processor, rows[a:b], EOT) for a, b in ((0, 1), (1, 8))]
    with torch.no_grad():
        mean_of_means = sum(model(**mb).loss for mb in uneven) / len(uneven)
    assert abs(mean_of_means - reference) > 1e-3


def test_two_processes_end_where_one_does(tiny_model_dir, toy_data_dir, tmp_path):
    # The plan: each step holds the same rows whatever the number of processes.
    args = sft.Args(data="-", global_batch_size=8, micro_batch_size=2)
    one = sft.micro_batch_plan(48, args, 0, 9, rank=0, world=1)
    two = [sft.micro_batch_plan(48, args, 0, 9, rank=r, world=2) for r in range(2)]
    for step in range(9):  # 9 steps cross an epoch boundary (6 steps per epoch)
        rows_one = sum(one[4 * step:4 * step + 4], [])
        rows_two = sum(two[0][2 * step:2 * step + 2] + two[1][2 * step:2 * step + 2], [])
        assert sorted(rows_one) == sorted(rows_two) and len(set(rows_one)) == 8
    assert sum(one[:24], []) != sum(one[24:], [])  # every epoch is a new permutation

    flags = ["--model", tiny_model_dir, "--data", toy_data_dir, "--split", "sft", "--learning_rate", "3e-3",
             "--global_batch_size", "8", "--max_steps", "3", "--save_steps", "0"]
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "sft.py"),
         *flags, "--micro_batch_size", "2", "--output_dir", str(tmp_path / "two")],
        env=run_env(), cwd=ROOT, check=True, timeout=240, capture_output=True)
    sft.main(flags + ["--micro_batch_size", "4", "--output_dir", str(tmp_path / "one")])

    # Loss and gradient norm are logged after the all-reduce: a wrong factor of 2 shows here
    # (Adam and clipping would hide it in the parameters).
    for m1, m2 in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), strict=True):
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    w1 = load_file(tmp_path / "one" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(w1["visual.merger.mlp.0.weight"], initial["visual.merger.mlp.0.weight"])


def test_loss_goes_down_and_the_final_model_loads(tiny_model_dir, toy_data_dir, tmp_path):
    # A fresh copy of the data: a cache file left by an earlier test would be reused, not written.
    data = str(shutil.copytree(toy_data_dir, tmp_path.parent / f"{tmp_path.name}-data",
                               ignore=shutil.ignore_patterns("cache-*")))
    before = snapshot(data)
    run_sft(tiny_model_dir, data, tmp_path, "--global_batch_size", "8", "--micro_batch_size",
            "8", "--max_steps", "20", "--save_steps", "10")
    # Nothing written next to the input (datasets' map/filter/cast would leave cache-*.arrow there).
    assert snapshot(data) == before
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["stage"] == "sft" and run["model"] == tiny_model_dir
    assert run["settings"]["learning_rate"] == 3e-3 and "micro_batch_size" not in run["settings"]
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 21))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gb"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3

    # Cosine with warmup, by hand: ceil(0.05 * 20) = 1 warmup step (lr 0), then
    # lr_k = 3e-3 * (1 + cos(pi * (k - 1) / 19)) / 2 for the k-th step counted from 0.
    assert metrics[0]["lr"] == 0.0 and metrics[1]["lr"] == pytest.approx(3e-3)
    assert metrics[10]["lr"] == pytest.approx(3e-3 * (1 + math.cos(math.pi * 9 / 19)) / 2)

    for folder in ("checkpoint-10", "checkpoint-20", "final"):
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / folder)
        AutoProcessor.from_pretrained(tmp_path / folder)
    assert json.loads((tmp_path / "checkpoint-20" / "resume_state.json").read_text())["step"] == 20
    assert (tmp_path / "checkpoint-20" / "training_state").is_dir()
    assert not list(tmp_path.glob("*.tmp"))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    trained = load_file(tmp_path / "final" / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert not torch.equal(trained["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def test_kill_and_resume_ends_where_an_uninterrupted_run_does(tiny_model_dir, toy_data_dir, tmp_path,
                                                              monkeypatch):
    """The checkpoint contract of docs/method.md section 10, killed at the worst moments."""
    flags = ("--global_batch_size", "4", "--micro_batch_size", "2", "--max_steps", "4",
             "--save_steps", "2")
    run_sft(tiny_model_dir, toy_data_dir, tmp_path / "straight", *flags)
    checkpoints = sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]

    # Killed during step 4: step 3 was logged, checkpoint-2 is the newest.
    real, calls = sft.accumulate_gradients, []

    def killed_at_step_4(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(sft, "accumulate_gradients", killed_at_step_4)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_sft(tiny_model_dir, toy_data_dir, killed, *flags)
    assert [m["step"] for m in read_metrics(killed)] == [1, 2, 3]
    assert not (killed / "final").exists()
    monkeypatch.setattr(sft, "accumulate_gradients", real)
    # As if it had also been killed while saving checkpoint-4 and while writing a metrics line.
    (killed / "checkpoint-4.tmp" / "training_state").mkdir(parents=True)
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.1')

    # Started again without --resume: refused, the folder untouched. A half-written folder is not a
    # checkpoint either.
    before = snapshot(killed)
    with pytest.raises(SystemExit, match="holds this run already. Pass --resume latest"):
        run_sft(tiny_model_dir, toy_data_dir, killed, *flags)
    with pytest.raises(FileNotFoundError, match="no resume_state.json there"):
        run_sft(tiny_model_dir, toy_data_dir, killed, *flags, "--resume", killed / "checkpoint-4.tmp")
    assert snapshot(killed) == before

    # --resume latest takes checkpoint-2 (never the .tmp), drops step 3 and the torn line, removes the
    # .tmp, and with --save_total_limit 1 keeps only the newest checkpoint (it does not change results).
    run_sft(tiny_model_dir, toy_data_dir, killed, *flags, "--resume", "latest", "--save_total_limit", "1")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(killed)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert sorted(p.name for p in killed.iterdir() if p.is_dir()) == ["checkpoint-4", "final"]

    # A finished run resumed: nothing to do, nothing touched. The same folder with other settings:
    # another run, refused (a batch split is not a setting: it does not change results).
    finished = snapshot(killed)
    run_sft(tiny_model_dir, toy_data_dir, killed, *flags, "--resume", "latest")
    run_sft(tiny_model_dir, toy_data_dir, killed, *flags, "--micro_batch_size", "4",
            "--resume", "latest")
    with pytest.raises(SystemExit, match="holds another run .*learning_rate"):
        sft.main(["--model", tiny_model_dir, "--data", toy_data_dir, "--split", "sft", "--output_dir",
                  str(killed), "--learning_rate", "1e-3", *flags, "--resume", "latest"])
    # A longer run is not this one extended: the cosine schedule is laid out over the run's length.
    with pytest.raises(SystemExit, match=r"--max_steps 6: .* cosine learning-rate schedule.*not this run "
                                         r"continued. Train a new run from .*final \(--model\)"):
        run_sft(tiny_model_dir, toy_data_dir, killed, *flags, "--max_steps", "6", "--resume", "latest")
    assert snapshot(killed) == finished


def test_optimizer_groups_and_frozen_vision(tiny_model_dir):
    """Weight decay on matrices and embeddings, not on biases and norms; --freeze_vision trains no
    vision parameter (the paper trains everything: the flag is off by default)."""
    assert sft.Args(data="-").freeze_vision is False
    model, _ = sft.load_model(sft.Args(data="-", model=tiny_model_dir, freeze_vision=True))
    optimizer, scheduler = sft.build_optimizer(model, sft.Args(data="-"), total_steps=100)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, plain = ({names[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["lr"] == 1e-5
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in decayed
    assert "model.language_model.embed_tokens.weight" in decayed
    assert {"model.language_model.layers.0.self_attn.q_proj.bias", "model.language_model.norm.weight",
            "model.language_model.layers.0.input_layernorm.weight"} <= plain
    assert not any("visual" in n for n in decayed | plain)
    assert decayed | plain == {n for n, p in model.named_parameters() if "visual" not in n}
    # ceil(5% of 100) = 5 warmup steps, then cosine to 0.
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:6] == pytest.approx([0, 2e-6, 4e-6, 6e-6, 8e-6, 1e-5])
    assert lrs[50] == pytest.approx(1e-5 * (1 + math.cos(math.pi * 45 / 95)) / 2)


# ---------------------------------------------------------------------------------------------
# Bad input: each fault a named error (the default) or a counted skip, before any model work
# ---------------------------------------------------------------------------------------------


def truncated_jpeg(row):
    jpeg = image_bytes(Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB"), "JPEG")
    return dict(row, images=[{"bytes": jpeg[:len(jpeg) // 2], "path": None}])


FAULTS = {  # fault: (how a row gets it, what the error says)
    "truncated JPEG": (truncated_jpeg, "image cannot be decoded"),
    "1x500 px image": (lambda r: dict(r, images=[{"bytes": image_bytes(Image.new("RGB", (1, 500)), "PNG"),
                                                  "path": None}]), "aspect ratio over 200"),
    "missing image file": (lambda r: dict(r, images=["images/missing.png"]), "image file not found"),
    "answer not the labelled option's text": (lambda r: dict(r, answer=r["answer"] + " (wrong)"),
                                              "is not the text of option"),
    "label not among options": (lambda r: dict(r, answer_label="Z"), "'Z' is not one of the option letters"),
    "question None": (lambda r: dict(r, question=None), "question must be a non-empty string"),
    "no reasoning": (lambda r: dict(r, reasoning=None), "no reasoning trace to fine-tune on"),
    "duplicate key": (lambda r: dict(r, dataset_name="ToyHeartRate", dataset_index=0), "occurs twice"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_row_is_a_named_error_or_a_counted_skip(fault, toy_data_dir, tmp_path):
    make_bad, problem = FAULTS[fault]
    rows, features = toy_rows(toy_data_dir, 8)
    bad_at = next(i for i, r in enumerate(rows) if r["images"] and r["dataset_index"] != 0)
    assert (rows[0]["dataset_name"], rows[0]["dataset_index"]) == ("ToyHeartRate", 0)  # the duplicated key
    rows[bad_at] = make_bad(rows[bad_at])
    name, index = rows[bad_at]["dataset_name"], rows[bad_at]["dataset_index"]
    if fault == "missing image file":  # file paths live in jsonl/parquet files
        data = write_rows(with_image_files(rows[:bad_at], tmp_path) + rows[bad_at:bad_at + 1]
                          + with_image_files(rows[bad_at + 1:], tmp_path), tmp_path / "rows.jsonl")
    else:
        data = write_rows(rows, tmp_path / "rows", features)

    # The default: one error naming the row and the problem. It comes before the model is loaded
    # (there is none at this path) and before anything is written.
    out = tmp_path / "out"
    with pytest.raises(reward.RowError, match=f"(?s)1 bad row.*dataset_name={name!r} dataset_index={index}: "
                                              f".*{re.escape(problem)}"):
        sft.main(["--model", str(tmp_path / "no_model"), "--data", data, "--split", "sft",
                  "--output_dir", str(out)])
    assert not out.exists()

    # --on_bad_row skip: the row is left out and counted; the others are kept in order.
    args = sft.Args(data=data, split="sft")
    loaded = runtime.load_split(data, "sft", columns=sft.COLUMNS)
    kept, bad = sft.usable_rows(loaded, args, "skip", Accelerator(cpu=True))
    assert [(b["position"], b["dataset_name"], b["dataset_index"]) for b in bad] == [(bad_at, name, index)]
    assert problem in bad[0]["reason"]
    assert kept["dataset_index"] == [r["dataset_index"] for i, r in enumerate(rows) if i != bad_at]


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "jsonl"])
def test_an_empty_dataset_is_a_named_error(kind, toy_data_dir, tmp_path):
    _, features = toy_rows(toy_data_dir, 0)
    path = tmp_path / {"save_to_disk": "rows", "parquet": "rows.parquet", "jsonl": "rows.jsonl"}[kind]
    data = write_rows([], path, features)
    with pytest.raises(ValueError, match=f"{path}.*(empty|no rows)"):
        sft.main(["--model", str(tmp_path / "no_model"), "--data", data, "--split", "sft",
                  "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_image_paths_in_a_data_file_are_read_relative_to_its_folder(suffix, tiny_model_dir, toy_data_dir,
                                                                     tmp_path, monkeypatch):
    """The same rows with their images as files give the same tensors as the saved data set."""
    rows, features = toy_rows(toy_data_dir, 8)
    data = write_rows(with_image_files(rows, tmp_path / "data"), tmp_path / "data" / f"rows{suffix}")
    monkeypatch.chdir(tmp_path)  # paths are relative to the file's folder, not to the working directory
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "right"
    args = sft.Args(data=data, split="sft", model=tiny_model_dir)
    loaded = runtime.load_split(data, "sft", columns=sft.COLUMNS)
    kept, bad = sft.usable_rows(loaded, args, "error", Accelerator(cpu=True))
    first = next(i for i, r in enumerate(rows) if r["images"])
    assert bad == [] and kept[first]["images"] == [f"images/{rows[first]['dataset_index']}-0.png"]
    kept, lengths, _ = sft.prepare_data(args, kept, processor, EOT, Accelerator(cpu=True))
    from_paths = sft.collate(list(range(8)), kept, lengths, processor, EOT, runtime.data_dir(data))
    saved = datasets.Dataset.from_list(rows, features=features)
    expected = sft.tokenize(processor, [saved[i] for i in range(8)], EOT)
    assert from_paths.keys() == expected.keys() and "pixel_values" in expected
    for key in expected:
        assert torch.equal(from_paths[key], expected[key]), key


def test_a_run_skips_a_bad_row_and_writes_nothing_next_to_its_input(tiny_model_dir, toy_data_dir, tmp_path,
                                                                     capsys):
    rows, _ = toy_rows(toy_data_dir, 17)
    rows = with_image_files(rows, tmp_path / "data")
    missing = next(i for i, r in enumerate(rows) if r["images"])
    rows[missing]["images"] = ["images/missing.png"]
    data = write_rows(rows, tmp_path / "data" / "rows.jsonl")
    before = snapshot(tmp_path / "data")

    out = tmp_path / "out"
    run_sft(tiny_model_dir, data, out, "--global_batch_size", "8", "--micro_batch_size", "4",
            "--max_steps", "2", "--save_steps", "0", "--on_bad_row", "skip", "--resume", "latest")
    printed = capsys.readouterr()
    assert "checking rows: 100%" in printed.err  # the row check shows its progress (the main process's)
    printed = printed.out
    assert "no complete checkpoint" in printed and "starts afresh" in printed and "1 bad row(s) skipped" in printed
    bad = [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert [(b["position"], b["dataset_index"]) for b in bad] == [(missing, rows[missing]["dataset_index"])]
    assert "image file not found: 'images/missing.png'" in bad[0]["reason"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert (out / "final" / "model.safetensors").exists()
    assert snapshot(tmp_path / "data") == before


def test_save_final_false_writes_nothing_at_the_end(tiny_model_dir, toy_data_dir, tmp_path):
    """--save_final False (benchmarks/gpu_check.py): the steps run and are logged, no model is written
    at the end; the checkpoints --save_steps asks for are still written."""
    run_sft(tiny_model_dir, toy_data_dir, tmp_path, "--global_batch_size", "8", "--micro_batch_size", "8",
            "--max_steps", "2", "--save_steps", "1", "--save_final", "False")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2", "metrics.jsonl", "run.json"]
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
