"""bf16 on a CPU (issue 12, part 2; docs/real_path.md section 4): the settings a GPU run uses.

A GPU run computes the policy under bf16 autocast over fp32 weights (`--mixed_precision bf16`, the
default `auto` on a GPU), loads the frozen reference model in bf16, and evaluates in bf16
(`evaluate.py --dtype bfloat16`, its `auto` on a GPU). torch autocasts to bf16 on CPUs too (this
one has avx512_bf16), so all of it runs here. What is checked:
- log-probs under bf16 stay within a stated tolerance of fp32 (the policy under autocast, the
  reference in bf16 weights);
- sft.py and grpo.py train in bf16 with finite losses close to fp32's, the reference model is bf16,
  and the saved model files have the dtype a user expects: bf16 after a bf16 run (the hub
  checkpoints are bf16), fp32 after an fp32 one, `--save_dtype` overriding; they load back in that
  dtype; training_state/ keeps the fp32 master weights for resuming;
- evaluate.py generates in bf16.
"""

import json
import math
import os

import datasets
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

import engine
import evaluate
import grpo
import reward
import sft
from test_grpo import warm_tiny_dir  # noqa: F401 (a fixture: the tiny model taught the answer format)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run here makes its own Accelerator with its own mixed precision; accelerate
    keeps one state per process and refuses a second precision, so the state is reset around."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def file_dtypes(folder) -> set:
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def metrics(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_bf16_logprobs_stay_close_to_fp32(warm_tiny_dir, toy_data_dir):  # noqa: F811
    """Measured on 67 sampled completion tokens of the tiny model taught the format (its logits
    reach about 20 in size): |logp_bf16 - logp_fp32| up to 0.023 (mean 0.0023) under autocast, up
    to 0.058 (mean 0.0031) with bf16 weights (the reference model); the random tiny model and the
    one with the real 151,936-token vocabulary: up to 0.0024. bf16 keeps 8 significant bits, so a
    logit of size 20 moves by up to 20 x 2^-9 = 0.04, and logp = logit - logsumexp twice that.
    On another warm model (the toy data of a clean checkout) the same test measured up to 0.28
    (mean 0.011) under autocast and 0.43 (mean 0.013) with bf16 weights: the largest errors sit on
    the largest logits, and which tokens are sampled depends on the model. Tolerance: 1.0 at most,
    0.03 on average; a broken cast (a wrong dtype, weights not converted) is off by whole units. What it
    means for GRPO: a typical ratio error of a few percent against a clip range of 20%."""
    processor = AutoProcessor.from_pretrained(warm_tiny_dir)
    never_ids = reward.never_generate_ids(processor.tokenizer)
    eos_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    rows = list(datasets.load_from_disk(toy_data_dir)["validation"].select(range(6)))  # 2 with an image
    fp32 = AutoModelForImageTextToText.from_pretrained(warm_tiny_dir, dtype=torch.float32).eval()
    texts, images = reward.chat_prompts(processor, rows)
    inputs = processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
    torch.manual_seed(0)
    args = grpo.Args(data="-", temperature=1.0, max_new_tokens=24)
    out = fp32.generate(**inputs, **grpo.sampling_kwargs(args, never_ids))
    samples = grpo.build_samples(processor, rows, engine.cut_completions(out[:, inputs["input_ids"].shape[1]:],
                                                                         eos_ids))
    batch = engine.collate(samples, processor.tokenizer.pad_token_id, "cpu")
    mask = batch["completion_mask"]
    bf16 = AutoModelForImageTextToText.from_pretrained(warm_tiny_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        reference = engine.completion_logprobs(fp32, batch, 1.0, never_ids)
        # accelerate's bf16 on a CPU is this autocast around the model's forward.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            policy = engine.completion_logprobs(fp32, batch, 1.0, never_ids, chunk_tokens=16)
        ref_model = engine.completion_logprobs(bf16, batch, 1.0, never_ids)
    assert policy.dtype == ref_model.dtype == torch.float32  # the log-softmax itself runs in fp32
    assert mask.sum() > 50 and reference[mask].min() < -1  # enough tokens, not all near-certain
    for logp in (policy, ref_model):
        difference = (logp - reference).abs()[mask]
        assert 0 < difference.max() <= 1.0 and difference.mean() <= 0.03


def test_sft_in_bf16_saves_bf16_and_keeps_fp32_master_weights(tiny_model_dir, toy_data_dir, tmp_path):
    flags = ["--model", tiny_model_dir, "--data", toy_data_dir, "--split", "sft", "--learning_rate", "3e-3",
             "--global_batch_size", "8", "--micro_batch_size", "4", "--max_steps", "6", "--save_steps", "3"]
    sft.main(flags + ["--mixed_precision", "bf16", "--output_dir", str(tmp_path / "bf16")])
    AcceleratorState._reset_state(reset_partial_state=True)
    sft.main(flags + ["--output_dir", str(tmp_path / "fp32")])  # auto on a CPU: fp32
    bf16, fp32 = metrics(tmp_path / "bf16"), metrics(tmp_path / "fp32")
    # Measured: the bf16 losses differ from fp32's by 2e-5 relative at most over 6 steps (a mean
    # over about 1,000 tokens averages the rounding out); 1e-3 is 50x that.
    for a, b in zip(bf16, fp32, strict=True):
        assert math.isfinite(a["loss"]) and math.isfinite(a["grad_norm"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3) and a["loss"] != b["loss"]
    assert bf16[-1]["loss"] < 0.95 * bf16[0]["loss"]
    # final/ and the model of each checkpoint: bf16 after a bf16 run, fp32 after an fp32 run;
    # config.json says so, and from_pretrained's default ("auto") loads them in that dtype.
    for folder in ("final", "checkpoint-3"):
        assert file_dtypes(tmp_path / "bf16" / folder) == {"BF16"}
        assert file_dtypes(tmp_path / "fp32" / folder) == {"F32"}
        assert AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16" / folder).dtype == torch.bfloat16
        assert AutoModelForImageTextToText.from_pretrained(tmp_path / "fp32" / folder).dtype == torch.float32
    size = {run: os.path.getsize(tmp_path / run / "final" / "model.safetensors") for run in ("bf16", "fp32")}
    assert size["bf16"] < 0.55 * size["fp32"]
    # Resuming reads training_state/, which keeps the fp32 master weights.
    assert file_dtypes(tmp_path / "bf16" / "checkpoint-3" / "training_state") == {"F32"}


def test_grpo_in_bf16_with_a_bf16_reference(warm_tiny_dir, toy_data_dir, tmp_path, monkeypatch):  # noqa: F811
    loaded = []
    load = grpo.AutoModelForImageTextToText.from_pretrained

    def recorded(path, **kwargs):
        loaded.append(kwargs.get("dtype"))
        return load(path, **kwargs)

    monkeypatch.setattr(grpo.AutoModelForImageTextToText, "from_pretrained", recorded)
    run = tmp_path / "run"
    final = grpo.main(["--model", warm_tiny_dir, "--data", toy_data_dir, "--output_dir", str(run),
                       "--mixed_precision", "bf16", "--max_steps", "2", "--rollout_batch_size", "4",
                       "--mini_batch_size", "2", "--group_size", "4", "--micro_batch_size", "4",
                       "--max_new_tokens", "16", "--learning_rate", "1e-3", "--beta", "0.05",
                       "--save_steps", "1", "--save_dtype", "float32", "--logprob_chunk_tokens", "8"])
    assert loaded == [torch.float32, torch.bfloat16]  # the policy's fp32 master weights; the reference
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2] and not any(r["skipped"] for r in records)
    for key in ("loss", "kl", "entropy", "grad_norm", "reward"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert records[1]["kl"] > 0  # the policy moved away from the bf16 reference
    # --save_dtype float32 overrides bf16 for the model files; training_state/ is fp32 in any case.
    assert file_dtypes(final) == file_dtypes(run / "checkpoint-1") == {"F32"}
    assert file_dtypes(run / "checkpoint-1" / "training_state") == {"F32"}
    assert AutoModelForImageTextToText.from_pretrained(final).dtype == torch.float32


def test_evaluate_in_bf16(warm_tiny_dir, toy_data_dir, tmp_path, monkeypatch):  # noqa: F811
    dtypes, load = [], evaluate.load_model

    def recorded(args, device):
        model = load(args, device)
        dtypes.append(model.dtype)
        return model

    monkeypatch.setattr(evaluate, "load_model", recorded)
    flags = ["--model", warm_tiny_dir, "--data", toy_data_dir, "--split", "test", "--max_new_tokens", "16",
             "--batch_size", "8"]
    bf16 = evaluate.main(flags + ["--dtype", "bfloat16", "--output_dir", str(tmp_path / "bf16")])
    fp32 = evaluate.main(flags + ["--output_dir", str(tmp_path / "fp32")])  # auto on a CPU: fp32
    assert dtypes == [torch.bfloat16, torch.float32]
    assert bf16["config"]["resolved_cli_args"]["dtype"] == "bfloat16" and set(bf16["results"]) == set(fp32["results"])
    with open(tmp_path / "bf16" / "predictions.jsonl") as f:
        responses = [json.loads(line)["responses"][0] for line in f]
    with open(tmp_path / "fp32" / "predictions.jsonl") as f:
        reference = [json.loads(line)["responses"][0] for line in f]
    # Greedy decoding in bf16 follows fp32's up to near-ties (a flipped token changes the rest of
    # the response); measured here: 22 of 24 responses identical.
    assert sum(a == b for a, b in zip(responses, reference)) >= 0.75 * len(reference)
    assert sum(map(reward.format_ok, responses)) > 0  # the taught format survives bf16
