"""grpo.py's shared prompt (--share_prompt, issue 16) equals its plain path: log-probs, the GRPO loss
and its gradients, with and without gradient checkpointing, on text-only, image and mixed
micro-batches (whole groups and groups cut across micro-batches); in fp64 up to 1e-15, so what is
left in fp32 is rounding; under DDP on two gloo processes; the rollout samples the same tokens with
a fixed seed; and a short grpo.main run with --share_prompt True has the plain run's first-step
metrics.

Tolerances (fp32; measured on the toy models, G = 8, completions of 1 to 64 tokens): the shared
path's log-probs (size ~7) differ from the plain path's by at most 1.4e-6, 1 to 2 ulp, as much as
the plain path moves when only its micro-batching changes; gradients by at most 2.1e-6 relative per
parameter tensor. So: log-probs atol 1e-5 (7x the worst measured); gradients per entry rtol 1e-4 /
atol 1e-6 (the tolerance tests/test_grpo.py uses for re-batched gradients) and per tensor a
relative norm of 1e-5 (5x the worst).
"""

import contextlib
import json
import math

import datasets
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForImageTextToText, AutoProcessor

import engine as engines
import evaluate
import grpo
import reward
import runtime
from test_grpo import warm_tiny_dir  # noqa: F401 (a fixture: the tiny model taught the answer format)

G = 4
LOGP_ATOL = 1e-5
GRAD_RTOL, GRAD_ATOL, GRAD_NORM_REL = 1e-4, 1e-6, 1e-5


@pytest.fixture(scope="module")
def rows(toy_data_dir):
    return list(datasets.load_from_disk(toy_data_dir)["validation"])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return (AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(tiny_model_dir))


def pick(rows, kind: str) -> list[dict]:
    """Three rows without an image, three with one, or four alternating."""
    text, image = [r for r in rows if not r["images"]], [r for r in rows if r["images"]]
    return {"text": text[:3], "image": image[:3], "mixed": [text[0], image[0], text[1], image[1]]}[kind]


def make_samples(processor, rows, group_size=G, seed=0, lengths=None):
    """G random completions of each row (allowed ids; about half end with <|im_end|>; lengths 1 to 24
    unless given), with advantages from random rewards."""
    gen = torch.Generator().manual_seed(seed)
    never = set(reward.never_generate_ids(processor.tokenizer))
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    allowed = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in never and i != end])
    completions = []
    for k in range(len(rows) * group_size):
        n = lengths[k % len(lengths)] if lengths else int(torch.randint(1, 25, (1,), generator=gen))
        ids = allowed[torch.randint(len(allowed), (n,), generator=gen)].tolist()
        if n > 1 and torch.rand(1, generator=gen) < 0.5:
            ids[-1] = end
        completions.append((ids, ids[-1] != end))
    samples = grpo.build_samples(processor, rows, completions)
    rewards = (torch.rand(len(samples), generator=gen) < 0.5).float()
    for s, a in zip(samples, grpo.group_advantages(rewards, group_size)):
        s.advantage = a.item()
    return samples, gen


def ids_of(processor):
    return reward.never_generate_ids(processor.tokenizer), processor.tokenizer.pad_token_id


def args_of(**kwargs) -> grpo.Args:
    return grpo.Args(data="-", temperature=0.7, **kwargs)


def engine_of(model, processor, shared: bool, **kwargs) -> engines.Engine:
    """grpo.py's engine (HF generate) with --share_prompt `shared` and the EngineArgs in kwargs."""
    return engines.Engine(engines.EngineArgs(share_prompt=shared, **kwargs), Accelerator(), processor, model,
                          model_path="", seed=0, max_model_len=0, images_per_prompt=1)


def pass_of(shared: bool):
    """(collate, log-prob function) of one micro-batch: the plain pass, or the shared prompt's."""
    if shared:
        return engines.collate_shared, engines.shared_completion_logprobs
    return engines.collate, engines.completion_logprobs


@torch.no_grad()
def logprobs(model, processor, samples, shared: bool, **kwargs) -> list[torch.Tensor]:
    """Every sample's completion log-probs, Engine.logprobs on --micro_batch_size samples at a time."""
    engine = engine_of(model, processor, shared, **kwargs)
    micro, out = engine.args.micro_batch_size, []
    for start in range(0, len(samples), micro):
        chunk = samples[start:start + micro]
        logp, _, _ = engine.logprobs(model, chunk, 0.7)
        out += [row[:len(s.completion_ids)] for row, s in zip(logp, chunk)]
    return out


def set_old_and_ref(model, processor, samples, gen):
    """logp_old and logp_ref away from the current log-probs, so that every clip acts."""
    for s, logp in zip(samples, logprobs(model, processor, samples, False, micro_batch_size=64)):
        s.old_logp = logp + torch.randn(logp.shape, generator=gen)
        s.ref_logp = logp + torch.randn(logp.shape, generator=gen)


class FirstUpdate:
    """A stand-in for runtime.Guard in grpo.update: it keeps the gradients of the first optimizer
    step, applies none, and lets only the first count in update's sums (the later ones are skips)."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def optimizer_step(self, optimizer, scheduler, loss, grad_norm) -> bool:
        first = self.grads is None
        if first:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)
        return first


def loss_and_grads(model, processor, samples, shared: bool, checkpointing: bool, micro_batch_size: int,
                   **kwargs):
    """One mini-batch of grpo.update (clipped surrogate + k3 KL over micro-batches): its statistics
    (STATS) and the gradients. update runs two mini-batches, both `samples`, so that logp_old is the
    samples' own (with one, update takes the current log-probs); only the first counts (`FirstUpdate`).
    No clipping of the gradient norm (max_grad_norm inf), so the gradients are the loss's."""
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    engine = engine_of(model, processor, shared, micro_batch_size=micro_batch_size)
    args = args_of(beta=0.1, rollout_batch_size=2, mini_batch_size=1, max_grad_norm=math.inf, **kwargs)
    guard = FirstUpdate(model)
    model.train()
    model.zero_grad()
    try:
        done = grpo.update(model, Accelerator(), None, None, engine, samples + samples, args, micro_batch_size,
                           guard)
    finally:
        model.eval()
        if checkpointing:
            model.activation_checkpointing_disable()
    assert len(done["grad_norms"]) == 1 and len(done["skips"]) == 1
    return done["sums"], guard.grads


def relative_difference(a: dict, b: dict) -> float:
    """The largest |a - b| / |a| over parameter tensors."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-30)).item() for k in a)


# ---------------------------------------------------------------------------------------------
# Micro-batches and positions
# ---------------------------------------------------------------------------------------------


def test_micro_batches_compute_each_prompt_once(tiny, rows):
    _, processor = tiny
    samples, _ = make_samples(processor, pick(rows, "mixed"), group_size=3)
    assert engines.prompt_runs(samples) == [3, 3, 3, 3]
    assert engines.prompt_runs(samples[5:12]) == [1, 3, 3]  # a micro-batch that cuts groups
    pad = processor.tokenizer.pad_token_id
    shared, plain = engines.collate_shared(samples[5:12], pad, "cpu"), engines.collate(samples[5:12], pad, "cpu")
    C = plain["completion_ids"].shape[1]
    assert shared["prompt_ids"].shape == (3, plain["input_ids"].shape[1] - C)
    assert torch.equal(shared["completion_ids"], plain["completion_ids"])
    assert torch.equal(shared["completion_mask"], plain["completion_mask"])
    # Images once per prompt: two of the three prompts hold one, which the plain batch holds 4 times.
    assert shared["image_grid_thw"].shape[0] == 2 and plain["image_grid_thw"].shape[0] == 4
    # The same question in two adjacent groups is one run: just as exact.
    twice, _ = make_samples(processor, [rows[0], rows[0]], group_size=2)
    assert engines.prompt_runs(twice) == [4]


def test_positions_continue_the_plain_paths(tiny, rows):
    """The rotary positions the shared path passes are those the model computes on the plain batch:
    with an image, get_rope_index over prompt + completion; without, the column index."""
    model, processor = tiny
    for kind in ("text", "mixed"):
        samples, _ = make_samples(processor, pick(rows, kind), group_size=2)
        pad = processor.tokenizer.pad_token_id
        plain, shared = engines.collate(samples, pad, "cpu"), engines.collate_shared(samples, pad, "cpu")
        prompt, start = engines.prompt_positions(model, shared)
        P, C = shared["prompt_ids"].shape[1], shared["completion_ids"].shape[1]
        if kind == "text":
            expected = torch.arange(P + C).view(1, 1, -1).expand(3, len(samples), -1)
        else:
            expected, _ = model.model.get_rope_index(plain["input_ids"], plain["mm_token_type_ids"],
                                                     image_grid_thw=plain["image_grid_thw"],
                                                     attention_mask=plain["attention_mask"])
        r = shared["repeats"]
        ours = torch.cat([prompt.repeat_interleave(r, 1),
                          (start.repeat_interleave(r)[:, None] + torch.arange(C)).expand(3, -1, -1)], -1)
        valid = plain["attention_mask"].bool()
        assert torch.equal(ours[:, valid], expected[:, valid])


# ---------------------------------------------------------------------------------------------
# Log-probs without gradient (logp_old, logp_ref), the loss and its gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "image", "mixed"])
def test_logprobs_equal_without_gradient(tiny, rows, kind):
    model, processor = tiny
    samples, _ = make_samples(processor, pick(rows, kind))
    plain = logprobs(model, processor, samples, False, micro_batch_size=2 * G)
    # Whole groups, groups cut across micro-batches, one micro-batch; chunked log-softmax too.
    for micro, chunk in ((2 * G, 2048), (G + G // 2, 2048), (len(samples), 7)):
        shared = logprobs(model, processor, samples, True, micro_batch_size=micro, logprob_chunk_tokens=chunk)
        print(f"{kind}, micro-batch {micro}: max |logp diff| "
              f"{max((a - b).abs().max().item() for a, b in zip(plain, shared)):.3g}")
        for a, b in zip(plain, shared, strict=True):
            torch.testing.assert_close(b, a, atol=LOGP_ATOL, rtol=0)


def test_completions_of_one_token(tiny, rows):
    """C = 1: the completion pass holds only the prompt's last token."""
    model, processor = tiny
    samples, _ = make_samples(processor, pick(rows, "mixed"), lengths=[1])
    plain = logprobs(model, processor, samples, False, micro_batch_size=2 * G)
    for a, b in zip(plain, logprobs(model, processor, samples, True, micro_batch_size=2 * G)):
        torch.testing.assert_close(b, a, atol=LOGP_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["text", "image", "mixed"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_gradients_equal(tiny, rows, kind, checkpointing):
    model, processor = tiny
    samples, gen = make_samples(processor, pick(rows, kind))
    set_old_and_ref(model, processor, samples, gen)
    plain_stats, plain = loss_and_grads(model, processor, samples, False, checkpointing, micro_batch_size=2 * G)
    assert (plain_stats[2:5] > 0).all()  # clip_low, clip_high, clip_dual: every clip acts
    for micro in (2 * G, G + G // 2):  # whole groups; groups cut across micro-batches
        stats, shared = loss_and_grads(model, processor, samples, True, checkpointing, micro_batch_size=micro)
        torch.testing.assert_close(stats, plain_stats, rtol=1e-5, atol=1e-6)  # loss, kl, clips, entropy, tokens
        print(f"{kind}, checkpointing {checkpointing}, micro-batch {micro}: loss relative difference "
              f"{abs(stats[0] / plain_stats[0] - 1).item():.3g}, max relative gradient difference "
              f"{relative_difference(plain, shared):.3g}")
        assert relative_difference(plain, shared) < GRAD_NORM_REL
        for k in plain:
            torch.testing.assert_close(shared[k], plain[k], rtol=GRAD_RTOL, atol=GRAD_ATOL)
    if kind != "text":  # the vision tower gets its gradient through the prompt's keys and values
        assert any(k.startswith("model.visual") for k in plain)


def test_seq_mean_token_mean_too(tiny, rows):
    model, processor = tiny
    samples, gen = make_samples(processor, pick(rows, "mixed"))
    set_old_and_ref(model, processor, samples, gen)
    kwargs = dict(micro_batch_size=2 * G, loss_agg="seq-mean-token-mean")
    plain_stats, plain = loss_and_grads(model, processor, samples, False, False, **kwargs)
    stats, shared = loss_and_grads(model, processor, samples, True, False, **kwargs)
    torch.testing.assert_close(stats, plain_stats, rtol=1e-5, atol=1e-6)
    assert relative_difference(plain, shared) < GRAD_NORM_REL


def test_without_the_switch_checkpointing_drops_the_cache(tiny, rows, monkeypatch):
    """Why `_cache_through_checkpointing` exists: transformers' checkpointed layers set
    past_key_values=None in training mode, so the prompt pass would record nothing and the
    completions would attend to themselves only. A named error, not a silent one."""
    model, processor = tiny
    samples, gen = make_samples(processor, pick(rows, "text"))
    set_old_and_ref(model, processor, samples, gen)
    monkeypatch.setattr(engines, "_cache_through_checkpointing", lambda module: contextlib.nullcontext())
    loss_and_grads(model, processor, samples, True, False, micro_batch_size=2 * G)  # no checkpointing: fine
    with pytest.raises(RuntimeError, match="recorded the keys and values of 0 layers"):
        loss_and_grads(model, processor, samples, True, True, micro_batch_size=2 * G)


def fp64_everywhere(monkeypatch):
    """Qwen2.5-VL computes its RMSNorms and the vision rotary embedding in fp32, and engine's log-softmax
    casts to fp32, whatever the model's dtype; for the fp64 check they keep the input's dtype (the
    same formulas)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    def norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        return q * cos + qwen.rotate_half(q) * sin, k * cos + qwen.rotate_half(k) * sin

    def token_logprobs(logits, targets, temperature, never_ids, with_entropy):
        logits = logits / temperature
        logits[..., never_ids] = -math.inf
        logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        return logp, torch.zeros_like(logp.detach())

    monkeypatch.setattr(qwen.Qwen2_5_VLRMSNorm, "forward", norm)
    monkeypatch.setattr(qwen, "apply_rotary_pos_emb_vision", rotary)
    monkeypatch.setattr(engines, "token_logprobs", token_logprobs)


def test_exact_in_fp64(tiny_model_dir, rows, monkeypatch):
    """In fp64 the two paths agree to ~1e-15 (log-probs and relative gradients, gradient
    checkpointing on, groups cut): what is left in fp32 is rounding, not a difference in what is
    computed (a wrong position, mask or token would show at the 1e-3 level here too)."""
    fp64_everywhere(monkeypatch)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float64)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    never, pad = ids_of(processor)
    samples, gen = make_samples(processor, pick(rows, "mixed"))
    for s in samples:
        s.pixel_values = None if s.pixel_values is None else s.pixel_values.double()
    weights = [torch.randn(len(s.completion_ids), generator=gen, dtype=torch.float64) for s in samples]
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    result = {}
    for shared, micro in ((False, 2 * G), (True, G + G // 2)):
        collate, fn = pass_of(shared)
        model.zero_grad()
        logps = []
        for start in range(0, len(samples), micro):
            chunk = samples[start:start + micro]
            batch = collate(chunk, pad, "cpu")
            logp = fn(model, batch, 0.7, never)
            w = torch.zeros_like(logp)
            for i, row in enumerate(weights[start:start + micro]):
                w[i, :len(row)] = row
            (logp * w * batch["completion_mask"]).sum().backward()
            logps += [r[:len(s.completion_ids)].detach() for r, s in zip(logp, chunk)]
        result[shared] = logps, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (lp0, g0), (lp1, g1) = result[False], result[True]
    assert lp0[0].dtype == torch.float64
    worst_logp = max((a - b).abs().max().item() for a, b in zip(lp0, lp1))
    worst_grad = relative_difference(g0, g1)
    print(f"fp64: max |logp diff| {worst_logp:.3g}, max relative gradient difference {worst_grad:.3g}")
    assert worst_logp < 1e-12 and worst_grad < 1e-10


# ---------------------------------------------------------------------------------------------
# Data parallel: two gloo processes, DDP with find_unused_parameters (grpo.py's setting)
# ---------------------------------------------------------------------------------------------


def _ddp_worker(rank, world, init_file, model_dir, rows, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    processor = AutoProcessor.from_pretrained(model_dir)
    never, pad = ids_of(processor)
    samples, gen = make_samples(processor, rows[rank], seed=rank)
    weights = [torch.randn(len(s.completion_ids), generator=gen) for s in samples]
    out = {}
    for shared in (False, True):
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ddp = DDP(model, find_unused_parameters=True)
        collate, fn = pass_of(shared)
        for k, chunk in enumerate([samples[:G], samples[G:]]):  # accumulation: no_sync on the first
            batch = collate(chunk, pad, "cpu")
            with ddp.no_sync() if k == 0 else contextlib.nullcontext():
                logp = fn(ddp, batch, 0.7, never)
                (logp * grpo.pad_rows(weights[k * G:(k + 1) * G], batch["completion_mask"], "cpu")).sum().backward()
        out[shared] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save(out, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_ddp_two_processes(tiny_model_dir, rows, tmp_path):
    """Process 0 holds an image prompt, process 1 none (its vision tower is unused): with gradient
    checkpointing and no_sync accumulation, both processes end with the same gradient, which is the
    plain path's."""
    import torch.multiprocessing as mp

    text, image = [r for r in rows if not r["images"]], [r for r in rows if r["images"]]
    result = str(tmp_path / "grads")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), tiny_model_dir, [[image[0], text[0]], text[1:3]],
                                result), nprocs=2, join=True)
    r0, r1 = torch.load(f"{result}.0"), torch.load(f"{result}.1")
    for shared in (False, True):  # all-reduced: both processes hold the same gradient
        assert relative_difference(r0[shared], r1[shared]) == 0
    assert any(k.startswith("model.visual") for k in r0[True])
    assert relative_difference(r0[False], r0[True]) < GRAD_NORM_REL


# ---------------------------------------------------------------------------------------------
# The rollout: prefill once, repeat the cache, sample
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,temperature", [("text", 1.0), ("image", 1.0), ("mixed", 1.0), ("mixed", 0.7)])
def test_rollout_same_samples_with_a_fixed_seed(tiny, rows, kind, temperature):
    """Engine.rollout with and without --share_prompt, two prompts per generate call: the sampler's
    random stream is unchanged, so the same seed gives the same tokens."""
    model, processor = tiny
    never, _ = ids_of(processor)
    kwargs = grpo.sampling_kwargs(grpo.Args(data="-", temperature=temperature, max_new_tokens=32), never)
    plain, shared = (engine_of(model, processor, share).rollout(model, pick(rows, kind), G, kwargs, 2,
                                                                seed=(42, 0)) for share in (False, True))
    assert plain == shared
    assert len({tuple(ids) for ids, _ in plain}) > 1  # sampled: not all the same


def test_rollout_prefills_each_prompt_once(tiny, rows):
    """What the saving is: the language model sees n x (P - 1) prompt tokens, then n G x 1, instead
    of n G x P; the vision tower sees each image once instead of G times."""
    model, processor = tiny
    never, _ = ids_of(processor)
    kwargs = grpo.sampling_kwargs(grpo.Args(data="-", max_new_tokens=4), never)
    chosen = pick(rows, "mixed")
    seen, patches = [], []
    h1 = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    h2 = model.model.visual.register_forward_pre_hook(lambda m, a, kw: patches.append(a[0].shape[0]),
                                                      with_kwargs=True)
    try:
        texts, images = reward.chat_prompts(processor, chosen)
        inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        engines.generate_shared(model, inputs, G, **kwargs)
    finally:
        h1.remove()
        h2.remove()
    P = inputs["input_ids"].shape[1]
    assert seen[:2] == [(len(chosen), P - 1), (len(chosen) * G, 1)]
    assert patches == [inputs["pixel_values"].shape[0]]


# ---------------------------------------------------------------------------------------------
# The whole loop: grpo.main with --share_prompt True
# ---------------------------------------------------------------------------------------------


def test_grpo_main_with_the_shared_prompt(warm_tiny_dir, toy_data_dir, tmp_path):  # noqa: F811
    """Two steps of grpo.main, plain and --share_prompt True: two optimizer steps a step (so the
    logp_old pass runs), a reference model, gradient checkpointing, micro-batches of 6 with groups of
    4 (groups cut). The same completions and rewards at every step (the rollout samples the same
    tokens); the first step's loss, KL, entropy and gradient norm within 1e-5 relative or 1e-7
    absolute (measured: 4e-7 relative at most, but the KL, a small difference of log-probs: 4.4e-6
    relative, 1.1e-9 absolute). The second step starts from weights that differ by rounding amplified
    by AdamW, whose first steps divide each entry's gradient by its own magnitude (tests/test_grpo.py
    measures the same for two processes against one): within 1e-3 (measured: 8e-6; 3e-4 in the
    prototype's third step)."""
    data_dir = str(tmp_path / "data")
    train = datasets.load_from_disk(toy_data_dir)["validation"].select(range(8))
    assert any(r["images"] for r in train) and not all(r["images"] for r in train)
    datasets.DatasetDict({"train": train}).save_to_disk(data_dir)
    argv = ["--model", warm_tiny_dir, "--data", data_dir, "--rollout_batch_size", "4", "--group_size", "4",
            "--mini_batch_size", "2", "--micro_batch_size", "6", "--generation_batch_size", "2",
            "--max_new_tokens", "14", "--learning_rate", "1e-3", "--beta", "0.05", "--max_steps", "2",
            "--save_steps", "0", "--save_final", "False"]
    runs = {}
    for shared in (False, True):
        out = tmp_path / f"shared_{shared}"
        grpo.main(argv + ["--output_dir", str(out), "--share_prompt", str(shared)])
        runs[shared] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(0 < m["reward"] < 1 for m in runs[False])  # groups disagree: there was something to learn
    for a, b in zip(runs[False], runs[True], strict=True):
        for key in ("reward", "accuracy", "completion_length", "zero_advantage_groups"):
            assert a[key] == b[key], key
        for key in ("loss", "kl", "entropy", "grad_norm"):
            print(f"step {a['step']} {key}: plain {a[key]:.9g} shared {b[key]:.9g}")
            assert math.isclose(a[key], b[key], rel_tol=1e-5 if a["step"] == 1 else 1e-3, abs_tol=1e-7), key


def test_share_prompt_is_not_a_setting():
    """A run folder accepts either value on --resume (the same computation up to rounding, as
    --micro_batch_size), so the default can change without locking older runs out."""
    assert "share_prompt" in runtime.NOT_SETTINGS
    settings = [runtime.settings(grpo.Args(data="d"), engines.EngineArgs(share_prompt=v)) for v in (False, True)]
    assert settings[0] == settings[1]


# ---------------------------------------------------------------------------------------------
# evaluate.py --share_prompt: pass counts from one prefill per row
# ---------------------------------------------------------------------------------------------


def test_evaluate_samples_with_the_shared_prompt_equal_the_plain_ones(tiny_model_dir, toy_data_dir, tmp_path,
                                                                      monkeypatch):
    """evaluate.py --n 4 at T 1.0 on 12 test rows (a text-only batch of 6, then a mixed one), with and
    without --share_prompt: the same seed gives the same 48 responses, line for line, and the same
    grades; each generate call gets the batch's 6 prompts once, n = 4 samples each from its cache.
    A folder written with one value resumes with the other (it is not a setting)."""
    def run(share, out):
        return evaluate.main(["--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", str(out),
                              "--n", "4", "--temperature", "1.0", "--max_new_tokens", "16", "--limit", "12",
                              "--batch_size", "6", "--share_prompt", str(share)])

    plain = run(False, tmp_path / "plain")
    calls, real_generate_shared = [], engines.generate_shared

    def counted(model, inputs, group_size, **kwargs):
        calls.append((inputs["input_ids"].shape[0], group_size))
        return real_generate_shared(model, inputs, group_size, **kwargs)

    monkeypatch.setattr(engines, "generate_shared", counted)
    shared = run(True, tmp_path / "shared")
    assert calls == [(6, 4), (6, 4)]

    def read(out):
        return [json.loads(line) for line in open(out / "predictions.jsonl")]

    lines = read(tmp_path / "plain")
    names = [line["dataset_name"] for line in lines]
    assert "ToyLesion" in names and set(names) - {"ToyLesion"}  # image and text-only rows
    assert read(tmp_path / "shared") == lines
    assert len({r for line in lines for r in line["responses"]}) > 12  # sampled, not all alike
    assert shared["results"] == plain["results"] and shared["config"] == plain["config"]
    run(True, tmp_path / "plain")  # the plain run's finished folder is accepted: nothing to generate
    assert len(calls) == 2
