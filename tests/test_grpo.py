"""grpo.py: the math of DESIGN.md section 5 on small tensors worked by hand, then the tiny model.

A random tiny model never writes the answer format, so every reward would be 0, every advantage 0
and no update would move anything; the tests that train start from `warm_tiny_dir`, the tiny model
taught the format (with a random letter) in a few seconds of plain cross-entropy.
"""

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import datasets
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import grpo
import reward
from conftest import ROOT, run_env

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
    assert grpo.completion_mask(ids, eos).long().tolist() == expected


# ---------------------------------------------------------------------------------------------
# The tiny model
# ---------------------------------------------------------------------------------------------


def test_bad_rows_are_reported_and_skipped(tiny_model_dir, toy_data_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rows = datasets.load_from_disk(toy_data_dir)["validation"].select(range(3))  # text, text, image
    image_row = rows[2]
    texts, images = reward.chat_prompts(processor, [image_row])
    length = processor(text=texts, images=images, return_tensors="pt")["input_ids"].shape[1]
    # The length check counts the image's tokens as the processor expands them, without running it.
    assert grpo.prompt_problem(image_row, processor, length) == ""
    assert "max_prompt_length" in grpo.prompt_problem(image_row, processor, length - 1)
    def n_tokens(row):
        texts, images = reward.chat_prompts(processor, [row])
        return processor(text=texts, images=images or None, return_tensors="pt")["input_ids"].shape[1]

    lengths = {row["dataset_index"]: n_tokens(row) for row in (rows[0], image_row, rows[1])}
    longest = max(lengths, key=lengths.get)
    assert list(lengths.values()).count(lengths[longest]) == 1
    broken = dict(rows[0], options="{not json", dataset_index=777)
    datasets.Dataset.from_list([rows[0], broken, image_row, rows[1]], features=rows.features).save_to_disk(
        str(tmp_path / "d"))
    messages = []
    limit = lengths[longest]
    kept = grpo.load_prompts(str(tmp_path / "d"), "train", processor, limit, messages.append)
    assert [r["dataset_index"] for r in kept] == [rows[0]["dataset_index"], image_row["dataset_index"],
                                                  rows[1]["dataset_index"]]
    assert len(messages) == 1 and "skipped 1 of 4" in messages[0] and "dataset_index=777" in messages[0]
    kept = grpo.load_prompts(str(tmp_path / "d"), "train", processor, limit - 1, messages.append)
    assert [r["dataset_index"] for r in kept] == [i for i in lengths if i != longest]
    assert "skipped 2 of 4 rows (1 too long" in messages[1]


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


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator()  # no GPU on the test machines; grpo.main() makes its own the same way


def load(model_dir):
    return (AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(model_dir))


def ids_of(processor):
    return reward.never_generate_ids(processor.tokenizer), [
        processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def test_logprob_pass_equals_generate_scores(warm_tiny_dir, toy_data_dir):
    """log_softmax of generate's processed scores (temperature, suppressed ids) at the sampled tokens
    equals the training pass over prompt + completion, with and without images, left padded."""
    model, processor = load(warm_tiny_dir)
    never_ids, eos_ids = ids_of(processor)
    args = grpo.Arguments(data="-", temperature=0.7, max_new_tokens=20)
    rows = list(datasets.load_from_disk(toy_data_dir)["validation"].select(range(6)))  # 2 with an image
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
        samples = grpo.split_samples(inputs, out.sequences, [len(r["images"] or []) for r in chunk], eos_ids)
        scores = torch.stack(out.scores, 1).log_softmax(-1)  # [n, new tokens, vocab]
        assert torch.isinf(scores[..., never_ids]).all()
        lengths += [len(s.completion_ids) for s in samples]
        # Micro-batches in another order and size than the generate call: padding differs.
        order = list(reversed(range(len(samples))))
        for start in range(0, len(order), 3):
            idx = order[start:start + 3]
            batch = grpo.collate([samples[i] for i in idx], processor.tokenizer.pad_token_id, "cpu")
            with torch.no_grad():
                logp = grpo.completion_logprobs(model, batch, args.temperature, never_ids)
            for row, i in enumerate(idx):
                n = len(samples[i].completion_ids)
                expected = scores[i, :n].gather(-1, samples[i].completion_ids[:, None]).squeeze(-1)
                # fp32 over a full forward vs generate's cached steps at T 0.7: differences of
                # about 1e-5 on log-probs of size up to ~10 are float rounding, hence rtol too.
                torch.testing.assert_close(logp[row, :n], expected, atol=1e-5, rtol=1e-5)
                assert batch["completion_mask"][row].sum() == n
    assert len(set(lengths)) > 1  # completions end at different places: right padding is exercised


def hand_sample(processor, row, completion: str, advantage: float = 0.0) -> grpo.Sample:
    texts, images = reward.chat_prompts(processor, [row])
    inputs = processor(text=texts, images=images or None, return_tensors="pt")
    completion_ids = torch.tensor(processor.tokenizer(completion + "<|im_end|>")["input_ids"])
    return grpo.Sample(prompt_ids=inputs["input_ids"][0], mm_token_type_ids=inputs["mm_token_type_ids"][0],
                       pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                       completion_ids=completion_ids, truncated=False, advantage=advantage)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_same_with_and_without_micro_batches(warm_tiny_dir, toy_data_dir, accelerator, loss_agg):
    model, processor = load(warm_tiny_dir)
    never_ids, _ = ids_of(processor)
    pad_id = processor.tokenizer.pad_token_id
    rows = list(datasets.load_from_disk(toy_data_dir)["validation"].select(range(3)))  # one with an image
    gen = torch.Generator().manual_seed(0)
    samples = []
    for row in rows:
        for letter, think in (("A", "ok"), ("B", "ok ok ok"), ("C", "x"), ("A", "y y")):  # lengths differ
            samples.append(hand_sample(processor, row, reward.sft_target(think, letter)))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    for s, a in zip(samples, grpo.group_advantages(rewards, 4)):
        s.advantage = a.item()
    current = grpo.sequence_logprobs(model, samples, grpo.Arguments(data="-", micro_batch_size=12),
                                     pad_id, never_ids, "cpu")
    for s, logp in zip(samples, current):  # old and ref policies away from the current one: clips act
        s.old_logp = logp + torch.randn(logp.shape, generator=gen)
        s.ref_logp = logp + torch.randn(logp.shape, generator=gen)

    def gradient(micro_batch_size):
        model.zero_grad()
        args = grpo.Arguments(data="-", micro_batch_size=micro_batch_size, beta=0.1, loss_agg=loss_agg)
        stats = grpo.accumulate_gradients(model, accelerator, samples, args, pad_id, never_ids,
                                          on_policy=False)
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], stats

    whole, stats = gradient(12)
    assert stats[2] > 0 and stats[3] > 0 and stats[4] > 0  # clip-low, clip-high and dual all occur
    # A naive reference: the mean over all tokens (or of per-sequence means) in one graph.
    model.zero_grad()
    batch = grpo.collate(samples, pad_id, "cpu")
    logp = grpo.completion_logprobs(model, batch, 1.0, never_ids)
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
    for a, p in zip(whole, [p for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)
    for micro in (1, 5):
        for a, b in zip(whole, gradient(micro)[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_one_update_raises_the_rewarded_answer(warm_tiny_dir, toy_data_dir, accelerator):
    model, processor = load(warm_tiny_dir)
    never_ids, _ = ids_of(processor)
    pad_id = processor.tokenizer.pad_token_id
    row = datasets.load_from_disk(toy_data_dir)["validation"][0]
    right, wrong = reward.sft_target("ok", "A"), reward.sft_target("ok", "B")
    samples = [hand_sample(processor, row, text) for text in (right, right, wrong, wrong)]
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    for s, a in zip(samples, grpo.group_advantages(rewards, 4)):
        s.advantage = a.item()
    for s, logp in zip(samples, grpo.sequence_logprobs(model, samples, grpo.Arguments(data="-"), pad_id,
                                                       never_ids, "cpu")):
        s.ref_logp = logp
    before = [lp.sum().item() for lp in grpo.sequence_logprobs(model, samples[1:3], grpo.Arguments(data="-"),
                                                               pad_id, never_ids, "cpu")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grpo.accumulate_gradients(model, accelerator, samples, grpo.Arguments(data="-", micro_batch_size=2),
                              pad_id, never_ids, on_policy=True)
    optimizer.step()
    after = [lp.sum().item() for lp in grpo.sequence_logprobs(model, samples[1:3], grpo.Arguments(data="-"),
                                                              pad_id, never_ids, "cpu")]
    assert after[0] > before[0] + 0.05  # the rewarded answer became more likely
    assert after[1] < before[1] - 0.05  # the other one less


# ---------------------------------------------------------------------------------------------
# Whole runs: two processes equal one; a killed run resumes as if never stopped
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


@pytest.fixture(scope="module")
def four_rows(toy_data_dir, tmp_path_factory) -> str:
    """Three text rows and one image row: one process of two always has a batch without an image."""
    out = str(tmp_path_factory.mktemp("four_rows"))
    train = datasets.load_from_disk(toy_data_dir)["train"].select(range(4))
    assert [bool(r["images"]) for r in train] == [False, False, True, False]
    datasets.DatasetDict({"train": train}).save_to_disk(out)
    return out


def test_two_processes_equal_one(warm_tiny_dir, four_rows, tmp_path):
    common = ["--model", warm_tiny_dir, "--data", four_rows, "--max_steps", "2", "--mini_batch_size", "4",
              "--save_steps", "0", "--eval_every", "2", "--eval_split", "train", "--eval_limit", "3",
              *RUN_ARGS]
    two = str(tmp_path / "two")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "cpu_2proc.yaml"), str(ROOT / "grpo.py"), "--output_dir", two, *common]
    proc = subprocess.Popen(launch, env=run_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    with one_thread():  # the one-process run, here, while the two processes start
        one = grpo.main(["--output_dir", str(tmp_path / "one"), *common])
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    one_metrics, two_metrics = read_metrics(tmp_path / "one"), read_metrics(two)
    assert [m["step"] for m in two_metrics] == [0, 1, 2]
    assert 0 < one_metrics[1]["reward"] < 1  # groups disagree: there was something to learn
    for a, b in zip(one_metrics, two_metrics):
        for key in ("reward", "accuracy", "completion_length", "zero_advantage_groups", "val_accuracy"):
            if key in a:
                assert a[key] == b[key], key
        for key in ("loss", "kl", "entropy", "grad_norm"):
            if key in a:
                assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-7), key
    w1, w2, w0 = weights(one), weights(os.path.join(two, "final")), weights(warm_tiny_dir)
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)  # the run trained
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)


def test_killed_run_resumes_identically(warm_tiny_dir, four_rows, tmp_path):
    # Two optimizer steps per rollout, so logp_old gets its own pass.
    common = ["--model", warm_tiny_dir, "--data", four_rows, "--max_steps", "3", "--mini_batch_size", "2",
              "--save_steps", "2", *RUN_ARGS]
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, str(ROOT / "grpo.py"), "--output_dir", killed, *common],
                            env=run_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = os.path.join(killed, "checkpoint-2")
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(checkpoint, "trainer_state.json")) and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint-2 in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in step 3, or (rarely) already done: we resume from step 2
    proc.wait(timeout=30)
    with one_thread():
        uninterrupted = grpo.main(["--output_dir", str(tmp_path / "uninterrupted"), *common])
        resumed = grpo.main(["--output_dir", killed, "--resume", checkpoint, *common])
    metrics_a, metrics_b = read_metrics(tmp_path / "uninterrupted"), read_metrics(killed)
    assert [m["step"] for m in metrics_b] == [1, 2, 3]
    for a, b in zip(metrics_a, metrics_b):
        for key in ("reward", "loss", "kl", "clip_low", "clip_high", "entropy", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-8), (a["step"], key)
    wa, wb = weights(uninterrupted), weights(resumed)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)
