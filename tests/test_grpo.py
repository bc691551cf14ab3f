"""grpo.py: the math of docs/method.md section 5 on small tensors worked by hand, then the tiny model,
then whole runs: one process equals two, a killed run resumes exactly, and the reliability contract
of docs/method.md section 10 (bad rows, run folders, checkpoints, the numerical guard).

A random tiny model never writes the answer format, so every reward would be 0, every advantage 0
and no update would move anything; the tests that train start from `warm_tiny_dir`, the tiny model
taught the format (with a random letter) in a few seconds of plain cross-entropy.
"""

import base64
import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import datasets
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import engine as engines
import grpo
import reward
import runtime
from conftest import RECORDER, ROOT, run_env

# ---------------------------------------------------------------------------------------------
# The math by hand
# ---------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
    # Group 1: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2. Group 2: all equal -> 0.
    # Group 3: mean 1/2, std sqrt(4 * 1/4 / 3) = 1/sqrt(3).
    s3 = 1 / math.sqrt(3)
    expected = [0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3 + [0.0] * 4 \
        + [0.5 / (s3 + 1e-6)] * 2 + [-0.5 / (s3 + 1e-6)] * 2
    torch.testing.assert_close(grpo.group_advantages(rewards, 4), torch.tensor(expected))
    unscaled = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, 0.5, 0.5, -0.5, -0.5]
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, scale_rewards=False), torch.tensor(unscaled))
    # The zero-variance group gives exactly 0, not 0/0.
    assert grpo.group_advantages(torch.ones(4), 4).eq(0).all()


def test_policy_loss_and_clips_by_hand():
    # One token per row, eps_low 0.2, eps_high 0.28 (so the two sides differ), dual clip c = 3.
    # Columns: A, log-ratio, expected loss, which clip.
    cases = [
        (1.0, math.log(1.1), -1.1, None),  # inside the trust region: -A rho
        (1.0, math.log(1.5), -1.28, "clip_high"),  # A > 0, rho > 1.28: -A (1 + eps_high)
        (1.0, math.log(0.5), -0.5, None),  # A > 0, rho small: the unclipped term is larger
        (-1.0, math.log(0.5), 0.8, "clip_low"),  # A < 0, rho < 0.8: -A (1 - eps_low)
        (-1.0, math.log(2.0), 2.0, None),  # A < 0, 1.28 < rho < c: -A rho
        (-1.0, math.log(5.0), 3.0, "clip_dual"),  # A < 0, rho > c: capped at -A c
        (-2.0, 30.0, 6.0, "clip_dual"),  # log-ratio clamped to 20 first; still capped: no inf
        (2.0, 30.0, -2.56, "clip_high"),
        (1.0, -30.0, -math.exp(-20.0), None),  # clamped to -20: exp(-20), not exp(-30)
        (0.0, 5.0, 0.0, None),  # zero advantage: no loss, no clip
    ]
    A = torch.tensor([c[0] for c in cases])
    old = torch.zeros(len(cases), 2)
    logp = torch.stack([torch.tensor([c[1] for c in cases]), torch.full((len(cases),), float("nan"))], 1)
    mask = torch.tensor([[True, False]] * len(cases))  # second token is padding holding a NaN
    loss = grpo.policy_loss(logp, old, A, mask, 0.2, 0.28, 3.0)
    assert loss.shape == (len(cases), 2)
    torch.testing.assert_close(loss[:, 0], torch.tensor([c[2] for c in cases]), rtol=1e-5, atol=0)
    assert loss[:, 1].eq(0).all()
    clipped = grpo.clipped_tokens(logp, old, A, mask, 0.2, 0.28, 3.0)
    for name in ("clip_low", "clip_high", "clip_dual"):
        assert clipped[name][:, 0].tolist() == [c[3] == name for c in cases], name
        assert not clipped[name][:, 1].any()
    # The gradient d(-A rho)/d logp = -A rho flows only where no clip is active and the log-ratio
    # is inside the clamp's [-20, 20] (a clamped value has no gradient).
    logp = logp[:, :1].clone().requires_grad_(True)
    grpo.policy_loss(logp, old[:, :1], A, mask[:, :1], 0.2, 0.28, 3.0).sum().backward()
    expected_grad = [-c[0] * math.exp(c[1]) if c[3] is None and abs(c[1]) < 20 else 0.0 for c in cases]
    torch.testing.assert_close(logp.grad[:, 0], torch.tensor(expected_grad), rtol=1e-5, atol=1e-12)


def test_kl_k3_by_hand():
    # d = ref - logp; kl = exp(d) - d - 1, d clamped to [-20, 20], kl clamped to [-10, 10].
    ref = torch.tensor([-1.0, math.log(2.0) - 1.0, -2.0, 4.0, 0.0, -1e30])
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0, float("-inf"), 0.0])
    expected = [0.0, 2.0 - math.log(2.0) - 1.0, math.exp(-1.0), 10.0, 10.0, 10.0]
    # d = 5 gives 142.4 -> 10; d = +inf (a -inf logp) would be inf - inf = NaN without the inner clamp;
    # d = -1e30 gives exp(-20) + 20 - 1 = 19 after the inner clamp -> 10.
    torch.testing.assert_close(grpo.kl_k3(logp, ref), torch.tensor(expected))
    assert grpo.kl_k3(torch.zeros(3), torch.zeros(3)).eq(0).all()


def test_completion_mask_by_position_not_by_pad():
    eos = [7, 9]
    ids = torch.tensor([[3, 7, 5, 9],   # ends at the first end token; later tokens are not ours
                        [3, 4, 5, 6],   # no end token: truncated, all of it counts
                        [9, 9, 9, 9],   # pad == end id: only the first one is the completion's
                        [4, 9, 9, 9]])
    expected = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert engines.completion_mask(ids, eos).long().tolist() == expected


def test_generation_settings_are_the_ones_grpo_always_passed():
    """The rollout samples, and validation decodes, with reward.generation_kwargs; the settings are
    key for key those grpo.py wrote out itself before (the demo's measured numbers depend on them)."""
    args = grpo.Args(data="-", temperature=0.7, top_p=0.9, max_new_tokens=33)
    never_ids = [5, 6]
    assert grpo.sampling_kwargs(args, never_ids) == dict(
        do_sample=True, temperature=0.7, top_k=0, top_p=0.9, min_p=None, repetition_penalty=1.0,
        max_new_tokens=33, suppress_tokens=never_ids)
    seen = {}

    class Recorder:
        """An engine that records the settings of its rollout and samples nothing."""

        processor = type("Decoder", (), {"batch_decode": staticmethod(lambda ids, **kwargs: [])})

        def __init__(self):
            self.never_ids = never_ids

        def rollout(self, model, rows, group_size, gen_kwargs, batch_size, **kwargs):
            seen.update(gen_kwargs)
            return []

    grpo.validate(None, Recorder(), [], args, 1, version=0)
    assert seen == dict(do_sample=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=33,
                        suppress_tokens=never_ids, temperature=None, top_k=None, top_p=None)


def test_arguments_and_validation_slice(toy_data_dir):
    """--num_epochs parses; the validation slice is the shuffle with --eval_seed (42, the slice of
    every earlier run), whatever --seed is."""
    assert runtime.parse_args(grpo.Args, argv=["--data", "d", "--num_epochs", "3"]).num_epochs == 3
    full = runtime.load_split(toy_data_dir, "validation")
    before = full.shuffle(seed=42, keep_in_memory=True).select(range(5), keep_in_memory=True)
    for seed in (0, 42):
        chosen = grpo.validation_slice(grpo.Args(data=toy_data_dir, eval_limit=5, seed=seed))
        assert chosen["dataset_index"] == before["dataset_index"]
    other = grpo.validation_slice(grpo.Args(data=toy_data_dir, eval_limit=5, eval_seed=1))
    assert other["dataset_index"] != before["dataset_index"]


# ---------------------------------------------------------------------------------------------
# The tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator()  # no GPU on the test machines; grpo.main() makes its own the same way


def test_long_prompts_are_counted_skips_and_bad_rows_named(tiny_model_dir, toy_data_dir, accelerator, capsys):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    validation = datasets.load_from_disk(toy_data_dir)["validation"]

    def n_tokens(row):
        texts, images = reward.chat_prompts(processor, [row])
        return processor(text=texts, images=images or None, return_tensors="pt")["input_ids"].shape[1]

    # Three consecutive rows (text, text, image: the families come in turn) with one longest prompt.
    for start in range(0, len(validation) - 2, 3):
        rows = validation.select(range(start, start + 3))
        lengths = {row["dataset_index"]: n_tokens(row) for row in rows}
        longest = max(lengths, key=lengths.get)
        if list(lengths.values()).count(lengths[longest]) == 1:
            break
    assert [bool(r["images"]) for r in rows] == [False, False, True]
    # The length counts the image's tokens as the processor expands them, without running it.
    assert [engines.prompt_length(processor, row, "") for row in rows] == list(lengths.values())
    assert list(lengths.values()).count(lengths[longest]) == 1
    broken = dict(rows[0], options="{not json", dataset_index=777)
    dataset = datasets.Dataset.from_list([rows[0], broken, rows[2], rows[1]], features=rows.features)
    kept, skipped = engines.usable_prompts(dataset, "d", "train", processor, lengths[longest] - 1, "skip",
                                           accelerator)
    order = [rows[0]["dataset_index"], rows[2]["dataset_index"], rows[1]["dataset_index"]]
    assert [r["dataset_index"] for r in kept] == [i for i in order if i != longest]
    assert [s["dataset_index"] for s in skipped] == [777, longest]
    assert "options is not valid JSON" in skipped[0]["reason"] and skipped[0]["data"] == "d:train"
    assert "max_prompt_length" in skipped[1]["reason"]
    err = capsys.readouterr().err  # the row check and the prompt lengths each show a progress bar
    assert "checking d:train" in err and "measuring the prompts of d:train" in err
    # --on_bad_row error (the default): a bad row is an error naming it; a long prompt stays a skip.
    with pytest.raises(reward.RowError, match="dataset_index=777"):
        engines.usable_prompts(dataset, "d", "train", processor, grpo.Args(data="-").max_prompt_length,
                               runtime.RunArgs().on_bad_row, accelerator)


@pytest.fixture(scope="module")
def warm_tiny_dir(tiny_model_dir, toy_data_dir, tmp_path_factory) -> str:
    """The tiny model after 80 steps of cross-entropy on `<think> ok </think> <answer> X </answer>`
    with X drawn at random: it writes the format, with a letter that is right a third of the time."""
    out = str(tmp_path_factory.mktemp("warm_tiny"))
    torch.manual_seed(0)
    rng = random.Random(0)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = processor.tokenizer
    rows = [r for r in datasets.load_from_disk(toy_data_dir)["sft"] if not r["images"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        batch = rng.sample(rows, 8)
        prompts, _ = reward.chat_prompts(processor, batch)
        targets = [reward.sft_target("ok", rng.choice("ABC")) + "<|im_end|>" for _ in batch]
        enc = tok([p + t for p, t in zip(prompts, targets)], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        for i, prompt in enumerate(prompts):
            labels[i, :len(tok(prompt)["input_ids"])] = -100
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def load(model_dir):
    return (AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(model_dir))


def ids_of(processor):
    return reward.never_generate_ids(processor.tokenizer), [
        processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def engine_of(model, processor, model_dir, accelerator, **settings) -> engines.Engine:
    """The run's engine (HF generate, engine.EngineArgs `settings`) around a model loaded here."""
    return engines.Engine(engines.EngineArgs(**settings), accelerator, processor, model, model_dir, seed=0,
                          max_model_len=4096, images_per_prompt=1)


def test_validation_shows_its_progress(tiny_model_dir, toy_data_dir, accelerator, capsys):
    """Validation (rows x up to max_new_tokens, while the step's bar stands still) has its own bar,
    over the prompts; it reports the accuracy overall and per benchmark."""
    model, processor = load(tiny_model_dir)
    engine = engine_of(model, processor, tiny_model_dir, accelerator, eval_batch_size=2)
    assert (engine.never_ids, engine.eos_ids) == ids_of(processor)
    rows = [reward.check_row(r) for r in datasets.load_from_disk(toy_data_dir)["validation"].select(range(3))]
    args = grpo.Args(data="-", max_new_tokens=4)
    metrics = grpo.validate(model, engine, rows, args, engine.args.eval_batch_size, version=0)
    assert set(metrics) == {"val_accuracy"} | {f"val_accuracy/{r['dataset_name']}" for r in rows}
    err = capsys.readouterr().err
    assert "validating:" in err and "0/3 [" in err


def test_logprob_pass_equals_generate_scores(warm_tiny_dir, toy_data_dir):
    """log_softmax of generate's processed scores (temperature, suppressed ids) at the sampled tokens
    equals the training pass over prompt + completion, with and without images, left padded; the
    samples are built as in training (prompt tensors from the processor, one row at a time)."""
    model, processor = load(warm_tiny_dir)
    never_ids, eos_ids = ids_of(processor)
    args = grpo.Args(data="-", temperature=0.7, max_new_tokens=20)
    candidates = list(datasets.load_from_disk(toy_data_dir)["validation"])
    text = [r for r in candidates if not r["images"]]
    # Two text prompts of different lengths first (left padding in the text-only batch), then four
    # more rows, two with an image.
    other = next(r for r in text[1:]
                 if engines.prompt_length(processor, r, "") != engines.prompt_length(processor, text[0], ""))
    images = [r for r in candidates if r["images"]][:2]
    rest = [r for r in text[1:] if r is not other][:2]
    rows = [text[0], other, images[0], rest[0], images[1], rest[1]]
    lengths = []
    for batch_rows in (rows[:2], rows):  # text only, then mixed
        chunk = [row for row in batch_rows for _ in range(2)]
        texts, images = reward.chat_prompts(processor, chunk)
        inputs = processor(text=texts, images=images or None, padding=True, padding_side="left",
                           return_tensors="pt")
        assert (inputs["attention_mask"] == 0).any()  # left padding is exercised
        torch.manual_seed(0)
        out = model.generate(**inputs, **grpo.sampling_kwargs(args, never_ids), output_scores=True,
                             return_dict_in_generate=True)
        completions = engines.cut_completions(out.sequences[:, inputs["input_ids"].shape[1]:], eos_ids)
        samples = grpo.build_samples(processor, batch_rows, completions)
        scores = torch.stack(out.scores, 1).log_softmax(-1)  # [n, new tokens, vocab]
        assert torch.isinf(scores[..., never_ids]).all()
        lengths += [len(s.completion_ids) for s in samples]
        # Micro-batches in another order and size than the generate call: padding differs.
        order = list(reversed(range(len(samples))))
        for start in range(0, len(order), 3):
            idx = order[start:start + 3]
            batch = engines.collate([samples[i] for i in idx], processor.tokenizer.pad_token_id, "cpu")
            with torch.no_grad():
                logp = engines.completion_logprobs(model, batch, args.temperature, never_ids)
            for row, i in enumerate(idx):
                n = len(samples[i].completion_ids)
                expected = scores[i, :n].gather(-1, samples[i].completion_ids[:, None]).squeeze(-1)
                # fp32 over a full forward vs generate's cached steps at T 0.7: differences of
                # about 1e-5 on log-probs of size up to ~10 are float rounding, hence rtol too.
                torch.testing.assert_close(logp[row, :n], expected, atol=1e-5, rtol=1e-5)
                assert batch["completion_mask"][row].sum() == n
    assert len(set(lengths)) > 1  # completions end at different places: right padding is exercised


def test_chunked_logprobs_equal_the_whole_computation(warm_tiny_dir, toy_data_dir, monkeypatch):
    """--logprob_chunk_tokens: the vocabulary log-softmax a chunk of tokens at a time, the backward
    recomputing each chunk (torch.utils.checkpoint), equals the computation over the whole [n, C, V]
    logits: log-probs bit for bit, entropies (for the logs) to 6e-8, gradients up to the order in
    which the output layer's gradient adds the chunks' parts (measured: 9e-7 of the largest entry).
    Chunks of 1 token take another matrix kernel (log-probs within 1e-6, not tested here)."""
    model, processor = load(warm_tiny_dir)
    never_ids, _ = ids_of(processor)
    rows = list(datasets.load_from_disk(toy_data_dir)["validation"].select(range(4)))  # one with an image
    generator = torch.Generator().manual_seed(0)
    samples = [s for row in rows for length in (5, 11, 17)
               for s in grpo.build_samples(processor, [row], [(torch.randint(0, 500, (length,), generator=generator)
                                                               .tolist(), True)])]
    batch = engines.collate(samples, processor.tokenizer.pad_token_id, "cpu")
    n, C = batch["completion_ids"].shape

    # The whole computation, written out: every completion position's logits at once.
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=batch["pixel_values"],
                image_grid_thw=batch["image_grid_thw"], use_cache=False, logits_to_keep=C + 1)
    logits = out.logits[:, :-1].float() / 0.7
    assert logits.shape == (n, C, model.config.text_config.vocab_size)
    logits[..., never_ids] = -math.inf
    whole = logits.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    whole_entropy = torch.special.entr(logits.softmax(-1)).sum(-1).detach()
    whole.sum().backward()
    whole_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    shapes, token_logprobs = [], engines.token_logprobs
    monkeypatch.setattr(engines, "token_logprobs", lambda logits, *a: (shapes.append(tuple(logits.shape)),
                                                                       token_logprobs(logits, *a))[1])
    for chunk in (7, 64, 0):
        shapes.clear()
        logp, entropy = engines.completion_logprobs(model, batch, 0.7, never_ids, with_entropy=True,
                                                    chunk_tokens=chunk)
        # Not bitwise: a matmul over 7 rows may take another kernel than one over all rows (on a
        # clean checkout chunk 7 differed in the last bits), so fp32 rounding is allowed.
        torch.testing.assert_close(logp, whole.detach(), rtol=0, atol=1e-5, msg=f"chunk {chunk}")
        # Measured 6e-8 and, on another warm model, 1.1e-6 (entropies of a few units).
        torch.testing.assert_close(entropy, whole_entropy, rtol=0, atol=1e-5)
        logp.sum().backward()
        for a, b in zip(whole_grads, [p.grad for p in model.parameters()]):
            assert (a - b).abs().max() <= 1e-5 * a.abs().max(), chunk
            assert chunk or (a - b).abs().max() <= 1e-6 * a.abs().max()  # one piece: the old computation
        model.zero_grad()
        # The logits that exist at once: one chunk's (forward, and again one by one in the backward;
        # a single piece is not recomputed).
        rows_at_once = chunk or n * C
        assert max(rows for rows, _ in shapes) == rows_at_once
        assert len(shapes) == (2 if chunk else 1) * math.ceil(n * C / rows_at_once)


def hand_sample(processor, row, completion: str, advantage: float = 0.0) -> grpo.Sample:
    completion_ids = processor.tokenizer(completion + "<|im_end|>")["input_ids"]
    sample = grpo.build_samples(processor, [row], [(completion_ids, False)])[0]
    sample.advantage = advantage
    return sample


class RecordingOptimizer:
    """Stands in for AdamW in `grpo.update`: each step keeps the gradients it would apply and moves
    no weight; zero_grad drops them, as AdamW's does."""

    def __init__(self, model):
        self.model, self.gradients = model, []

    def step(self):
        self.gradients.append([p.grad.clone() for p in self.model.parameters() if p.grad is not None])

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


class Constant:
    """A learning-rate schedule that never changes anything."""

    def step(self):
        pass


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_same_with_and_without_micro_batches(warm_tiny_dir, toy_data_dir, accelerator, loss_agg):
    """The gradient `grpo.update` applies for a mini-batch of 12 samples (3 groups of 4) is the
    naive one: token-mean, grad( sum_t l_t / T ) with T the mini-batch's completion tokens (or the
    mean of per-sequence token means), whatever the micro-batches it is accumulated over. Two
    optimizer steps per rollout (the same 12 samples twice), so that the update reads logp_old from
    the samples: set away from the current policy, every clip acts. No gradient clipping."""
    model, processor = load(warm_tiny_dir)
    never_ids, _ = ids_of(processor)
    pad_id = processor.tokenizer.pad_token_id
    engine = engine_of(model, processor, warm_tiny_dir, accelerator)
    args = grpo.Args(data="-", group_size=4, rollout_batch_size=6, mini_batch_size=3, beta=0.1,
                     loss_agg=loss_agg, max_grad_norm=1e30)
    assert args.updates_per_step == 2
    rows = list(datasets.load_from_disk(toy_data_dir)["validation"].select(range(3)))  # one with an image
    gen = torch.Generator().manual_seed(0)
    samples = []
    for row in rows:
        for letter, think in (("A", "ok"), ("B", "ok ok ok"), ("C", "x"), ("A", "y y")):  # lengths differ
            samples.append(hand_sample(processor, row, reward.sft_target(think, letter)))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    for s, a in zip(samples, grpo.group_advantages(rewards, 4)):
        s.advantage = a.item()
    # logp_old and logp_ref of the current policy (the model twice), then moved away from it: clips act.
    grpo.old_and_ref_logprobs(model, model, engine, samples, args, micro=12)
    for s in samples:
        s.old_logp = s.old_logp + torch.randn(s.old_logp.shape, generator=gen)
        s.ref_logp = s.ref_logp + torch.randn(s.ref_logp.shape, generator=gen)

    def gradient(micro_batch_size):
        model.zero_grad()
        optimizer = RecordingOptimizer(model)
        updates = grpo.update(model, accelerator, optimizer, Constant(), engine, samples + samples, args,
                              micro_batch_size, runtime.Guard(runtime.GuardArgs()))
        assert len(optimizer.gradients) == len(updates["grad_norms"]) == 2 and not updates["skips"]
        return optimizer.gradients[0], dict(zip(grpo.STATS, updates["sums"]))

    whole, stats = gradient(12)
    assert stats["clip_low"] > 0 and stats["clip_high"] > 0 and stats["clip_dual"] > 0  # all three occur
    # A naive reference: the mean over all tokens (or of per-sequence means) in one graph.
    model.zero_grad()
    batch = engines.collate(samples, pad_id, "cpu")
    logp = engines.completion_logprobs(model, batch, 1.0, never_ids)
    mask = batch["completion_mask"]
    old = grpo.pad_rows([s.old_logp for s in samples], mask, "cpu")
    ref = grpo.pad_rows([s.ref_logp for s in samples], mask, "cpu")
    advantages = torch.tensor([s.advantage for s in samples])
    kl = grpo.kl_k3(logp, ref) * mask
    per_token = grpo.policy_loss(logp, old, advantages, mask, 0.2, 0.2, 3.0) + 0.1 * kl
    if loss_agg == "token-mean":
        naive = per_token.sum() / mask.sum()
    else:
        naive = (per_token.sum(1) / mask.sum(1)).mean()
    naive.backward()
    # Sums in another order and padding of another width: fp32 rounding of about 1e-7 on entries
    # that are sums of terms up to ~1e-2 (measured: 1.6e-7 at most), so atol 1e-6 beside rtol.
    for a, p in zip(whole, [p for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    for micro in (1, 5):
        for a, b in zip(whole, gradient(micro)[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_one_update_raises_the_rewarded_answer(warm_tiny_dir, toy_data_dir, accelerator):
    """One rollout of one prompt, one optimizer step of AdamW (on-policy, the KL to the starting
    model, no gradient clipping): the rewarded letter gains probability, the other loses it."""
    model, processor = load(warm_tiny_dir)
    engine = engine_of(model, processor, warm_tiny_dir, accelerator)
    args = grpo.Args(data="-", group_size=4, rollout_batch_size=1, mini_batch_size=1, max_grad_norm=1e30)
    row = datasets.load_from_disk(toy_data_dir)["validation"][0]
    right, wrong = reward.sft_target("ok", "A"), reward.sft_target("ok", "B")
    samples = [hand_sample(processor, row, text) for text in (right, right, wrong, wrong)]
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    for s, a in zip(samples, grpo.group_advantages(rewards, 4)):
        s.advantage = a.item()
    grpo.old_and_ref_logprobs(model, model, engine, samples, args, micro=8)  # logp_ref: the model itself
    # The two completions differ in one token, the letter; the tokens they share get opposite
    # gradients from the two groups and, under AdamW's first, sign-like step, move by noise.
    letter = next(i for i, (a, b) in enumerate(zip(samples[0].completion_ids, samples[2].completion_ids))
                  if a != b)

    def letter_logps():
        with torch.no_grad():
            logps, _, _ = engine.logprobs(model, samples[1:3], args.temperature)
        return [lp[letter].item() for lp in logps]

    before = letter_logps()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    updates = grpo.update(model, accelerator, optimizer, Constant(), engine, samples, args, 2,
                          runtime.Guard(runtime.GuardArgs()))
    assert len(updates["grad_norms"]) == 1 and not updates["skips"]
    after = letter_logps()
    assert after[0] > before[0] + 0.01  # the rewarded answer became more likely
    assert after[1] < before[1] - 0.01  # the other one less


def test_collapse_warning_on_a_crafted_sequence():
    """docs/method.md section 10: K steps in a row without a well-formatted completion and with every
    group's rewards equal give one warning naming the step; anything else resets the count."""
    guard = runtime.Guard(runtime.GuardArgs(max_skipped_steps=3, collapse_steps=3))

    def record(step, format_rate, zero_advantage_groups):
        return {"step": step, "skipped": False, "format_rate": format_rate,
                "zero_advantage_groups": zero_advantage_groups, "reward": 0.0, "loss": 0.0, "grad_norm": 0.0,
                "kl": 0.0, "entropy": 6.2}

    sequence = [(0.5, 0.25), (0.0, 1.0), (0.0, 1.0),  # two collapsed steps, then:
                (0.1, 1.0),  # all groups equal, but some completions well formatted (all right, or all wrong)
                (0.0, 1.0), (0.0, 1.0), (0.0, 1.0),  # three in a row: the warning, once
                (0.0, 1.0), (0.0, 1.0)]
    warnings = {step: guard.after_step(record(step, *values)) for step, values in enumerate(sequence, 1)}
    assert [step for step, warning in warnings.items() if warning] == [7]
    assert warnings[7].startswith("warning: step 7: for 3 steps in a row no completion had the answer format")
    assert "entropy 6.2" in warnings[7]
    assert runtime.Guard(runtime.GuardArgs(collapse_steps=0)).after_step(record(1, 0.0, 1.0)) is None  # 0: never
    # A collapse that lasts 10 x --collapse_steps stops the run, naming the step and where it began:
    # steps 5-9 are collapsed already, so steps 10-34 make 30 in a row and step 34 stops.
    for step in range(10, 34):
        guard.after_step(record(step, 0.0, 1.0))
    with pytest.raises(SystemExit, match=r"grpo.py stopped at step 34: for 30 steps in a row \(10 x "
                                         r"--collapse_steps 3\).*checkpoint from before step 5"):
        guard.after_step(record(34, 0.0, 1.0))
    never = runtime.Guard(runtime.GuardArgs(collapse_steps=0))
    assert all(never.after_step(record(step, 0.0, 1.0)) is None for step in range(1, 200))


# ---------------------------------------------------------------------------------------------
# Whole runs: two processes equal one; a killed run resumes as if never stopped; run folders
# ---------------------------------------------------------------------------------------------

RUN_ARGS = ["--rollout_batch_size", "4", "--group_size", "2", "--micro_batch_size", "2",
            "--generation_batch_size", "1", "--max_new_tokens", "14", "--learning_rate", "1e-3",
            "--beta", "0.05", "--gradient_checkpointing", "False", "--eval_batch_size", "1"]


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses: the same reductions, the same numbers
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(model_dir):
    return load_file(os.path.join(model_dir, "model.safetensors"))


def listing(folder) -> dict:
    """Every file under a folder with its size and modification time: a folder that nothing touched."""
    return {os.path.join(root, name): (os.stat(os.path.join(root, name)).st_size,
                                       os.stat(os.path.join(root, name)).st_mtime_ns)
            for root, _, names in os.walk(folder) for name in names}


@pytest.fixture(scope="module")
def four_rows(toy_data_dir, tmp_path_factory) -> str:
    """Three text rows and one image row: one process of two always has a batch without an image."""
    out = str(tmp_path_factory.mktemp("four_rows"))
    train = datasets.load_from_disk(toy_data_dir)["train"].select(range(4))
    assert [bool(r["images"]) for r in train] == [False, False, True, False]
    datasets.DatasetDict({"train": train}).save_to_disk(out)
    return out


@pytest.fixture(scope="module")
def idle_first_pair(four_rows, tmp_path_factory) -> str:
    """`four_rows` with rows 0 and 1 given a fourth option D as their answer. The warm model writes
    A, B or C, so their groups all score 0 and have A = 0: with --mini_batch_size 2 the first update's
    gradient is the KL term's alone, where the policy still equals the reference."""
    out = str(tmp_path_factory.mktemp("idle_first_pair"))

    def unanswerable(row, i):
        if i < 2:
            row["options"] = json.dumps(json.loads(row["options"]) | {"D": "None of these"})
            row["answer_label"], row["answer"] = "D", "None of these"
        return row

    train = datasets.load_from_disk(four_rows)["train"].map(unanswerable, with_indices=True)
    datasets.DatasetDict({"train": train}).save_to_disk(out)
    return out


@pytest.mark.parametrize("generation_batch_size", [2, 4], ids=["calls-aligned", "calls-not-aligned"])
def test_two_processes_equal_one_at_the_papers_kl(generation_batch_size, warm_tiny_dir, idle_first_pair,
                                                  tmp_path):
    """At the defaults (beta 0.01, --share_prompt, gradient checkpointing) and 8 steps, 2 processes
    with --micro_batch_size 8 give the rollouts, metrics and weights, bit for bit, of 1 process with
    --micro_batch_size 4: the fp32 sums are then the same ones in the same order. Each process holds
    1 prompt x G = 4 samples of each mini-batch (one micro-batch); one process holds 8, cut in the same
    two micro-batches of 4; its gradient accumulates a + b, DDP's all-reduce of two processes adds
    a + b, and the loss's factor W = 2 and DDP's mean over W are powers of two, exact. So the derived
    tolerance is 0. Generate calls of 2 prompts give each process one call; calls of 4 give rank 0
    the only one. The first mini-batch teaches nothing (`idle_first_pair`): the reference pass must
    batch as the update does, or its rounding becomes the whole first gradient (measured before that:
    2.3e-3 apart after 8 steps, where training moved the weights by 1.2e-2). Validation at step 0, 4
    and 8 (greedy, 2 prompts a call, dealt to processes) gives every process the same answers too,
    and the input folder is never written into (its validation slice included)."""
    common = ["--model", warm_tiny_dir, "--data", idle_first_pair, "--max_steps", "8", "--save_steps", "0",
              "--eval_every", "4", "--eval_split", "train", "--eval_limit", "3", "--eval_batch_size", "2",
              "--rollout_batch_size", "4", "--group_size", "4", "--mini_batch_size", "2",
              "--generation_batch_size", str(generation_batch_size), "--max_new_tokens", "48",
              "--learning_rate", "1e-3"]
    inputs = listing(idle_first_pair)
    two = str(tmp_path / "two")
    (tmp_path / "recorder.py").write_text(RECORDER)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "cpu_2proc.yaml"), str(tmp_path / "recorder.py"),
              str(tmp_path / "rollouts"), "--output_dir", two, *common, "--micro_batch_size", "8"]
    proc = subprocess.Popen(launch, env=run_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    one = str(tmp_path / "one")
    (tmp_path / "one_recorder.py").write_text(RECORDER)
    single = subprocess.run([sys.executable, str(tmp_path / "one_recorder.py"), str(tmp_path / "one_rollouts"),
                             "--output_dir", one, *common, "--micro_batch_size", "4"],
                            env=run_env(), cwd=ROOT, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    with open(tmp_path / "one_rollouts.0") as f:
        one_rollouts = json.load(f)
    assert len(one_rollouts) == 8 + 3  # 8 steps, validation at steps 0, 4 and 8
    for rank in (0, 1):
        with open(tmp_path / f"rollouts.{rank}") as f:
            assert json.load(f) == one_rollouts, rank
    one_metrics, two_metrics = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in one_metrics] == list(range(9)) and "val_accuracy" in one_metrics[4]
    assert one_metrics[1]["zero_advantage_groups"] >= 0.5  # rows 0 and 1 teach nothing
    assert 0 < one_metrics[1]["reward"] < 1 and all(m["kl"] > 0 for m in one_metrics[2:])
    timing = ("time_", "tokens_per_s", "generate_tokens_per_s", "mfu", "peak_memory_gb")
    for a, b in zip(one_metrics, two_metrics, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(timing)} == \
               {k: v for k, v in b.items() if not k.startswith(timing)}
    w1, w2, w0 = weights(os.path.join(one, "final")), weights(os.path.join(two, "final")), weights(warm_tiny_dir)
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1) > 5e-3  # the run trained
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert listing(idle_first_pair) == inputs


def test_killed_run_resumes_identically(warm_tiny_dir, four_rows, tmp_path):
    """docs/method.md section 10: --resume latest takes the newest complete checkpoint, ignoring (and
    removing) the .tmp folder of an interrupted save and a metrics line torn by the kill."""
    # Two optimizer steps per rollout, so logp_old gets its own pass.
    common = ["--model", warm_tiny_dir, "--data", four_rows, "--max_steps", "3", "--mini_batch_size", "2",
              *RUN_ARGS]
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, str(ROOT / "grpo.py"), "--output_dir", killed,
                             "--save_steps", "2", *common], env=run_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = os.path.join(killed, "checkpoint-2")
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(checkpoint, "resume_state.json")) and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint-2 in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in step 3, or (rarely) already done: we resume from step 2
    proc.wait(timeout=30)
    shutil.rmtree(os.path.join(killed, "final"), ignore_errors=True)  # (rarely) it had finished
    os.makedirs(os.path.join(killed, "checkpoint-3.tmp"))  # a save the kill interrupted
    with open(os.path.join(killed, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "rew')  # a line the kill tore
    with one_thread():
        # The uninterrupted run saves every step and keeps the newest two checkpoints; its last
        # step writes final/ alone (a finished run is never resumed: no optimizer state).
        uninterrupted = grpo.main(["--output_dir", str(tmp_path / "uninterrupted"), "--save_steps", "1",
                                   "--save_total_limit", "2", *common])
        resumed = grpo.main(["--output_dir", killed, "--save_steps", "2", "--resume", "latest", *common])
    assert sorted(os.listdir(tmp_path / "uninterrupted")) == ["checkpoint-1", "checkpoint-2", "final",
                                                             "metrics.jsonl", "report.html", "run.json"]
    # A checkpoint holds the final folder's files but the model card, and the training state.
    assert sorted(os.listdir(tmp_path / "uninterrupted" / "checkpoint-2")) == sorted(
        set(os.listdir(tmp_path / "uninterrupted" / "final")) - {"README.md"} | {"resume_state.json", "training_state"})
    assert not os.path.exists(os.path.join(killed, "checkpoint-3.tmp"))
    metrics_a, metrics_b = read_metrics(tmp_path / "uninterrupted"), read_metrics(killed)
    assert [m["step"] for m in metrics_b] == [1, 2, 3]
    for a, b in zip(metrics_a, metrics_b):
        for key in ("reward", "loss", "kl", "clip_low", "clip_high", "entropy", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-8), (a["step"], key)
    wa, wb = weights(uninterrupted), weights(resumed)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)


def test_run_folders_afresh_refused_finished(tiny_model_dir, four_rows, tmp_path, capsys):
    """--resume latest with no checkpoint starts afresh; the folder of a finished run is refused
    without --resume and left untouched with it; another run's folder is refused."""
    run = str(tmp_path / "run")
    args = ["--model", tiny_model_dir, "--data", four_rows, "--output_dir", run, "--max_steps", "1",
            "--mini_batch_size", "4", "--save_steps", "0", *RUN_ARGS]
    assert grpo.main([*args, "--resume", "latest"]) == os.path.join(run, "final")
    assert "no complete checkpoint" in capsys.readouterr().out
    before = listing(run)
    with pytest.raises(SystemExit, match="holds this run already. Pass --resume latest"):
        grpo.main(args)
    assert grpo.main([*args, "--resume", "latest"]) == os.path.join(run, "final")
    assert "this run is finished" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds another run.*settings differ: learning_rate"):
        grpo.main([*args, "--learning_rate", "0.5", "--resume", "latest"])
    with pytest.raises(FileNotFoundError, match=r"not a complete checkpoint \(no resume_state.json there\)"):
        grpo.main([*args[:5], str(tmp_path / "other"), *args[6:], "--resume", run])
    assert listing(run) == before


def test_extending_a_finished_run(warm_tiny_dir, four_rows, tmp_path, capsys):
    """A finished run given a larger --max_steps with --resume latest continues to the same weights
    as a run given that length from the start (the constant schedule: no step's learning rate
    depends on the length); its first final/ is kept aside. A schedule laid out over the length is
    refused, saying why, and nothing is touched."""
    common = ["--model", warm_tiny_dir, "--data", four_rows, "--mini_batch_size", "4", "--save_steps", "1",
              *RUN_ARGS]
    with one_thread():
        longer = grpo.main([*common, "--output_dir", str(tmp_path / "three"), "--max_steps", "3"])
        run = str(tmp_path / "run")
        short = grpo.main([*common, "--output_dir", run, "--max_steps", "2"])
        first_final = weights(short)
        extended = grpo.main([*common, "--output_dir", run, "--max_steps", "3", "--resume", "latest"])
    assert "extending the run from --max_steps 2 to 3" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    wa, wb = weights(longer), weights(extended)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    kept = weights(os.path.join(run, "final-max_steps-2"))
    assert all(torch.equal(kept[k], first_final[k]) for k in kept)
    assert not all(torch.equal(kept[k], wb[k]) for k in kept)  # step 3 trained
    assert json.load(open(os.path.join(run, "run.json")))["settings"]["max_steps"] == 3
    # Finished again: a rerun does nothing; the same length is this run, not an extension.
    assert grpo.main([*common, "--output_dir", run, "--max_steps", "3", "--resume", "latest"]) == extended

    cosine = str(tmp_path / "cosine")
    grpo.main([*common, "--output_dir", cosine, "--max_steps", "1", "--lr_scheduler_type", "cosine"])
    before = listing(cosine)
    with pytest.raises(SystemExit, match=r"--max_steps 2: .* with a cosine learning-rate schedule, laid out over "
                                         r"the run's length.*not this run continued"):
        grpo.main([*common, "--output_dir", cosine, "--max_steps", "2", "--lr_scheduler_type", "cosine",
                   "--resume", "latest"])
    assert listing(cosine) == before
    # Without --resume a longer run is another run, as before.
    with pytest.raises(SystemExit, match="holds another run .settings differ: max_steps"):
        grpo.main([*common, "--output_dir", run, "--max_steps", "4"])


def test_logged_completions_are_the_groups_grpo_trained_on(warm_tiny_dir, four_rows, tmp_path):
    """--log_completions 2: every step, 2 groups to completions.jsonl, each completion with the reward
    reward.py gives its text, the advantage group_advantages gives the group's rewards, its length,
    format and clipped share; a group of equal rewards is marked. A run resumed from its step-1
    checkpoint logs step 2 again, as the uninterrupted run did."""
    run = str(tmp_path / "run")
    common = ["--model", warm_tiny_dir, "--data", four_rows, "--output_dir", run, "--max_steps", "2",
              "--mini_batch_size", "2", "--save_steps", "1", "--log_completions", "2", *RUN_ARGS]
    with one_thread():
        grpo.main(common)
    lines = [json.loads(line) for line in open(os.path.join(run, "completions.jsonl"))]
    assert [line["step"] for line in lines] == [1, 1, 2, 2]
    rows = datasets.load_from_disk(four_rows)["train"]
    questions = {reward.build_prompt_text(row): row for row in rows}
    G = 2
    for line in lines:
        row = questions[line["question"]]  # one of the data's questions, with its answer
        assert line["answer_label"] == row["answer_label"] and len(line["completions"]) == G
        rewards = [c["reward"] for c in line["completions"]]
        assert rewards == [reward.reward(c["text"], row["answer_label"], row["answer"]) for c in line["completions"]]
        expected = grpo.group_advantages(torch.tensor(rewards), G).tolist()
        assert [c["advantage"] for c in line["completions"]] == pytest.approx(expected, abs=1e-6)
        assert line["zero_advantage"] == (len(set(rewards)) == 1)
        for c in line["completions"]:
            assert c["format_ok"] == reward.format_ok(c["text"]) and 0 <= c["clipped"] <= 1 and c["length"] >= 1
        for image in line["images"]:
            assert image.startswith("data:image/png;base64,")
            assert Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1]))).size[0] <= 128
    assert any(line["images"] for line in lines) or not any(row["images"] for row in rows)
    assert "What GRPO trained on" in open(os.path.join(run, "report.html")).read()  # written at the end
    # Killed after checkpoint-1: step 2's lines are dropped and logged again, the same.
    shutil.rmtree(os.path.join(run, "final"))
    with open(os.path.join(run, "completions.jsonl"), "a") as f:
        f.write('{"step": 2, "quest')  # torn by the kill
    with one_thread():
        grpo.main([*common, "--resume", "latest"])
    assert [json.loads(line) for line in open(os.path.join(run, "completions.jsonl"))] == lines


def test_config_file_then_flags(tiny_model_dir, four_rows, tmp_path):
    """`python grpo.py config.yaml --flag x`: the file gives settings (the required --data among
    them), flags after it override it."""
    run = tmp_path / "run"
    config = tmp_path / "grpo.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {four_rows}\noutput_dir: {run}\nnum_epochs: 3\n"
                      "mini_batch_size: 4\nsave_steps: 0\nlearning_rate: 0.5\n")
    done = subprocess.run([sys.executable, "grpo.py", str(config), "--num_epochs", "1", *RUN_ARGS], env=run_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run)] == [1]  # 1 epoch of 4 rows at B = 4, not 3
    with open(run / "run.json") as f:
        settings = json.load(f)["settings"]
    assert (settings["num_epochs"], settings["mini_batch_size"], settings["learning_rate"]) == (1, 4, 1e-3)


def test_save_final_false_writes_nothing_at_the_end(tiny_model_dir, four_rows, tmp_path):
    """--save_final False (benchmarks/gpu_check.py): the run trains and logs, and writes no model at
    its end; the checkpoints --save_steps asks for are still written."""
    run = tmp_path / "run"
    assert grpo.main(["--model", tiny_model_dir, "--data", four_rows, "--output_dir", str(run), "--max_steps", "2",
                      "--mini_batch_size", "4", "--save_steps", "1", "--save_final", "False", *RUN_ARGS]) is None
    assert sorted(os.listdir(run)) == ["checkpoint-1", "metrics.jsonl", "run.json"]
    assert [m["step"] for m in read_metrics(run)] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Bad input (docs/method.md section 10): every fault a named error, or a counted skip
# ---------------------------------------------------------------------------------------------


def save_png(path, width, height, truncate=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (width, height), (120, 30, 60)).save(path, format="JPEG" if truncate else "PNG")
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def with_image_paths(folder, rows, kind="jsonl") -> str:
    """The rows as a jsonl or parquet file whose images are file paths relative to it."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for row in rows:
        paths = []
        for k, image in enumerate(row["images"] or []):
            if isinstance(image, str):
                paths.append(image)
                continue
            paths.append(f"img/{row['dataset_index']}_{k}.png")
            os.makedirs(os.path.join(folder, "img"), exist_ok=True)
            image.save(os.path.join(folder, paths[-1]))
        schema = {k: v for k, v in row.items() if k in reward.SCHEMA_COLUMNS}
        lines.append(dict(schema, images=paths))
    path = os.path.join(folder, f"train.{kind}")
    if kind == "parquet":
        datasets.Dataset.from_list(lines).to_parquet(path)
    else:
        with open(path, "w") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
    return path


# fault -> (the row's fields changed, words of the error). Image files are made by `faulty_rows`.
FAULTS = {
    "truncated JPEG": ({"images": ["img/truncated.jpg"]}, "image cannot be decoded"),
    "1x500 px image": ({"images": ["img/thin.png"]}, "1x500 px: aspect ratio over 200"),
    "missing image file": ({"images": ["img/missing.png"]}, "image file not found"),
    "answer not the labelled option's text": ({"answer": "no option says this"}, "is not the text of option"),
    "label not among the options": ({"answer_label": "Z"}, "is not one of the option letters"),
    "question None": ({"question": None}, "question must be a non-empty string"),
    "options not JSON": ({"options": "{A: oops"}, "options is not valid JSON"),
    "duplicate (dataset_name, dataset_index)": ({}, "occurs twice"),
}


def faulty_rows(folder, good, faults, kind="jsonl") -> str:
    """`good` rows and one row per fault (dataset_index 900 + k), with image paths."""
    save_png(os.path.join(folder, "img", "truncated.jpg"), 56, 56, truncate=True)
    save_png(os.path.join(folder, "img", "thin.png"), 1, 500)
    rows = list(good)
    for k, fault in enumerate(faults):
        changes, _ = FAULTS[fault]
        index = good[0]["dataset_index"] if fault.startswith("duplicate") else 900 + k
        rows.append(dict(good[0], dataset_index=index, **changes))
    return with_image_paths(folder, rows, kind)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_bad_row_is_a_named_error(fault, tiny_model_dir, four_rows, tmp_path):
    good = list(datasets.load_from_disk(four_rows)["train"])
    data = faulty_rows(str(tmp_path / "data"), good, [fault])
    with pytest.raises(reward.RowError) as err:
        grpo.main(["--model", tiny_model_dir, "--data", data, "--output_dir", str(tmp_path / "run"),
                   "--mini_batch_size", "4", *RUN_ARGS])
    name = f"dataset_index={good[0]['dataset_index'] if fault.startswith('duplicate') else 900}"
    assert "1 bad row(s) of 5" in str(err.value) and FAULTS[fault][1] in str(err.value)
    assert name in str(err.value).split(FAULTS[fault][1])[0].splitlines()[-1]  # on the fault's own line


@pytest.mark.parametrize("rows,expected", [([], "the file is empty"), (None, "missing column")])
def test_empty_data_and_missing_column_are_named_errors(rows, expected, tiny_model_dir, four_rows, tmp_path):
    data = tmp_path / "train.jsonl"
    rows_of_four = datasets.load_from_disk(four_rows)["train"]
    good = [{k: v for k, v in r.items() if k != "answer"} for r in rows_of_four]
    data.write_text("" if rows == [] else "\n".join(json.dumps(dict(r, images=None)) for r in good))
    with pytest.raises(ValueError, match=expected) as err:
        grpo.main(["--model", tiny_model_dir, "--data", str(data), "--output_dir", str(tmp_path / "run")])
    assert str(data) in str(err.value)
    assert not os.path.exists(tmp_path / "run")  # refused before the folder was claimed


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_bad_rows_skipped_counted_and_image_paths_work(kind, tiny_model_dir, four_rows, tmp_path, capsys):
    """--on_bad_row skip: every fault (and a prompt over --max_prompt_length) is a counted skip listed
    in bad_rows.jsonl; the good rows train, images read from paths relative to the data file."""
    good = list(datasets.load_from_disk(four_rows)["train"])
    long = dict(good[0], dataset_index=999, question=good[0]["question"] * 40)
    data = faulty_rows(str(tmp_path / "data"), good + [long], list(FAULTS), kind)
    inputs = listing(tmp_path / "data")
    run = tmp_path / "run"
    grpo.main(["--model", tiny_model_dir, "--data", data, "--output_dir", str(run), "--on_bad_row", "skip",
               "--max_prompt_length", "1000", "--max_steps", "1", "--mini_batch_size", "4",
               "--save_steps", "0", *RUN_ARGS])
    assert f"{data}:train: skipped 9 of 13 rows (1 prompts longer than --max_prompt_length, 8 bad rows)" \
        in capsys.readouterr().out
    with open(run / "bad_rows.jsonl") as f:
        skipped = [json.loads(line) for line in f]
    assert len(skipped) == 9
    by_index = {}
    for s in skipped:
        by_index.setdefault(s["dataset_index"], []).append(s["reason"])
    for k, (fault, (_, words)) in enumerate(FAULTS.items()):
        index = good[0]["dataset_index"] if fault.startswith("duplicate") else 900 + k
        assert any(words in reason for reason in by_index[index]), fault
    assert "max_prompt_length 1000" in by_index[999][0]
    # Step 1 read all four good rows (B = 4), the image row among them: images given as paths work.
    assert read_metrics(run)[0]["step"] == 1
    assert listing(tmp_path / "data") == inputs


# ---------------------------------------------------------------------------------------------
# The numerical guard (docs/method.md section 10)
# ---------------------------------------------------------------------------------------------


def test_nonfinite_gradients_skip_steps_then_stop(warm_tiny_dir, four_rows, tmp_path, monkeypatch):
    """From the second optimizer step on, one gradient entry is NaN: each such step is skipped (the
    weights do not move) and logged; the third in a row stops the run naming the step and the last
    finite metrics."""
    clip, calls = Accelerator.clip_grad_norm_, []

    def poisoned(self, parameters, *args, **kwargs):  # once per optimizer step, its gradients complete
        parameters = list(parameters)
        calls.append(1)
        if len(calls) > 1:
            next(p for p in parameters if p.grad is not None).grad.view(-1)[0] = math.nan
        return clip(self, parameters, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", poisoned)
    run = tmp_path / "run"
    with one_thread(), pytest.raises(SystemExit) as stop:
        grpo.main(["--model", warm_tiny_dir, "--data", four_rows, "--output_dir", str(run),
                   "--max_steps", "6", "--mini_batch_size", "4", "--save_steps", "1", *RUN_ARGS])
    message = str(stop.value)
    assert message.startswith("grpo.py stopped at step 4: 3 optimizer steps in a row skipped for a "
                              "non-finite loss or gradient norm (update 1 of 1: loss ")
    assert 'last finite metrics: {"step": 1, ' in message
    records = read_metrics(run)
    assert [(r["step"], r["skipped"]) for r in records] == [(1, False), (2, True), (3, True), (4, True)]
    assert all("grad_norm nan" in r["skip_reason"] and r["loss"] is None and r["grad_norm"] is None
               for r in records[1:])
    w1, w3 = weights(run / "checkpoint-1"), weights(run / "checkpoint-3")
    assert all(torch.equal(w1[k], w3[k]) for k in w1)  # skipped steps never moved a weight
    assert not os.path.exists(run / "final")


def test_diverged_weights_stop_with_the_step_and_cause(warm_tiny_dir, four_rows, tmp_path):
    """At lr 1e30 the first update leaves weights near 1e30; the next rollout's probabilities are
    NaN, and the run stops naming the step and the cause, not with a traceback from inside generate."""
    with one_thread(), pytest.raises(SystemExit) as stop:
        grpo.main(["--model", warm_tiny_dir, "--data", four_rows, "--output_dir", str(tmp_path / "run"),
                   "--max_steps", "3", "--mini_batch_size", "4", "--save_steps", "0", *RUN_ARGS,
                   "--learning_rate", "1e30"])
    message = str(stop.value)
    assert message.startswith("grpo.py stopped at step 2: sampling failed (probability tensor contains")
    assert "the policy after step 1 gives non-finite probabilities" in message
    assert "lower --learning_rate (now 1e+30)" in message
