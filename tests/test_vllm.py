"""evaluate.py --engine vllm: the same predictions as HF generate where they must be equal (greedy, fp32),
the same distribution where they cannot be (sampling), the same files, suppression and resuming.
grpo.py --engine vllm (the last section): after a weight sync vLLM's log-probs are the policy's; its
rollouts suppress, stop and seed as grpo.py's; a few GRPO steps through it go as through HF generate.
Last, `make reproduce-3b ENGINE=vllm` runs end to end on the toy world.

vLLM is optional (`make install-vllm`, docs/vllm.md): without it this module is skipped. On a CPU its
attention needs a head size in {32, 64, 80, ...}, so the model is toy.py's `tiny32`, trained for 100
steps on the toy teacher's traces so that it writes the <think>/<answer> format and gets some
questions right (greedy accuracy 0.375 on the 24 test rows, about 0.15 at T 1.0): grades then mean
something.
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import engine as engines
import evaluate
import grpo
import reward
from conftest import RECORDER, ROOT, run_env, save_toy_model

WHY_SKIPPED = "vLLM is optional and not installed: `make install-vllm` (docs/vllm.md) runs these tests"
# Decided without importing vLLM: its import takes about 11 s and sets up process-wide state (logging,
# torch settings), which the rest of the suite, collected in the same process, should not see.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason=WHY_SKIPPED)


@pytest.fixture(scope="module")
def vllm():
    """vLLM, imported when the first test here needs it, set up as engine.VLLM sets it up:
    in-process engine, a 1 GiB KV cache on the CPU, torch's thread count kept."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return pytest.importorskip("vllm", reason=WHY_SKIPPED)

TOKENS = 96  # long enough for the trained model's whole answer (its traces are 40-70 tokens)
SAMPLED = ("--n", 16, "--temperature", 1.0)


def train_format(model_dir: str, data_dir: str, out: str, steps: int = 100):
    """A few steps of plain SFT on the `sft` split's traces (loss on the completion only), enough for
    a model this small to write the format: sft.py's job, done here in a few lines so this test
    depends on nothing but the model and the data."""
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "right"
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    stored = datasets.load_from_disk(data_dir)["sft"].with_format("arrow")
    rows = [reward.check_row(row, data_dir) for row in stored[list(range(len(stored)))].to_pylist()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
        prompts, images = reward.chat_prompts(processor, batch)
        texts = [p + reward.sft_target(r["reasoning"], r["answer_label"]) + "<|im_end|>"
                 for p, r in zip(prompts, batch)]
        inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        prompt_lengths = [len(ids) for ids in processor(text=prompts, images=images or None)["input_ids"]]
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        for i, length in enumerate(prompt_lengths):
            labels[i, :length] = -100
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(model_dir).save_pretrained(out)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A random tiny32, as `python toy.py model --size tiny32` saves it."""
    return save_toy_model(str(tmp_path_factory.mktemp("tiny32")), "tiny32")


@pytest.fixture(scope="module")
def model_dir(base_dir, toy_data_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tiny32_trained")
    train_format(base_dir, toy_data_dir, str(out))
    return str(out)


def run(model_dir, data_dir, out, engine, *extra):
    return evaluate.main(["--engine", engine, "--model", str(model_dir), "--data", str(data_dir),
                          "--output_dir", str(out), "--max_new_tokens", str(TOKENS), *map(str, extra)])


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8", newline="\n")]


@pytest.fixture(scope="module")
def sampled(vllm, model_dir, toy_data_dir, tmp_path_factory):
    """n = 16 samples at T 1.0 of the 24 test rows through each engine (pass counts)."""
    out = tmp_path_factory.mktemp("sampled")
    return {engine: (run(model_dir, toy_data_dir, out / engine, engine, *SAMPLED), out / engine)
            for engine in ("hf", "vllm")}


def test_greedy_predictions_equal_hf(vllm, model_dir, toy_data_dir, tmp_path):
    """The same prompts, stops and decoding: greedy answers equal HF generate's, line for line, in a
    batch of 24 that mixes the image rows (ToyLesion) with the text-only ones."""
    results = {e: run(model_dir, toy_data_dir, tmp_path / e, e, "--batch_size", 24) for e in ("hf", "vllm")}
    hf, vl = (read(tmp_path / e / "predictions.jsonl") for e in ("hf", "vllm"))
    assert {line["dataset_name"] for line in hf} == {"ToyHeartRate", "ToyFever", "ToyLesion"}
    assert [line["responses"] for line in vl] == [line["responses"] for line in hf]
    assert vl == hf  # every field: prompt, grades, order
    assert results["vllm"]["results"] == results["hf"]["results"]
    # The model answers some questions right: grades are tested.
    assert results["hf"]["groups"]["average"]["accuracy,none"] > 0.2
    assert any("</answer>" in r for line in hf for r in line["responses"])
    # The same results.json, but for the engine (an HF run's settings stay as before --engine).
    vllm_config, hf_config = results["vllm"]["config"], results["hf"]["config"]
    assert vllm_config.pop("model_backend") == "vllm" and hf_config.pop("model_backend") == "hf"
    assert vllm_config["resolved_cli_args"].pop("engine") == "vllm" and "engine" not in hf_config["resolved_cli_args"]
    assert set(results["vllm"]) == set(results["hf"])
    assert vllm_config == hf_config


@pytest.mark.slow
def test_synth_generate_and_verify_with_vllm_equal_hf(vllm, base_dir, tmp_path):
    """synth.py's model steps through vLLM: the same greedy answers, byte for byte, as HF generate
    (the official prompts are 2,000-3,000 tokens on the toy tokenizer; a two-image figure included)."""
    import synth
    import toy

    figures = tmp_path / "figures"
    toy.build_figures(toy.FiguresArgs(output_dir=str(figures), n=8)).save_to_disk(str(figures))
    generated = tmp_path / "generated.jsonl"  # recorded questions, so that the verifier is asked
    with open(generated, "w", encoding="utf-8") as f:
        for i in range(8):
            mcq = {"question": f"Which finding is shown in case {i}?", "options": {k: f"finding {k}" for k in "ABCDE"},
                   "answer": "ABCDE"[i % 5]}
            f.write(json.dumps({"dataset_index": i, "generator": "glm", "generator_response": json.dumps(mcq)}) + "\n")
    out = {}
    for engine in ("hf", "vllm"):
        for step, data in (("generate", figures), ("verify", generated)):
            extra = ["--figures", str(figures)] if step == "verify" else []
            out[engine, step] = synth.main([step, "--engine", engine, "--model", base_dir, "--data", str(data),
                                            "--output_dir", str(tmp_path / engine / step), "--max_new_tokens", "16",
                                            "--batch_size", "3", *extra]).read_bytes()
    for step in ("generate", "verify"):
        assert out["vllm", step] == out["hf", step]
    assert all(json.loads(line)["verifier_response"] for line in out["hf", "verify"].splitlines())


def test_sampled_pass_counts_agree_in_distribution(sampled):
    """The two engines draw different samples (other generators) from one distribution: per row, the
    share of correct samples (what a pass count is made of) and of well-formed ones. The rows are
    the units (a row's 16 samples are not independent); the paired mean difference over 24 rows must
    lie within 4 standard errors. With the seeds fixed the test is deterministic; a correct sampler
    fails it for about 1 in 16,000 seed choices. A wrong temperature fails it: greedy scores 0.375
    here, sampling about 0.15, a difference of 10 standard errors."""
    for key in ("correct", "pass_correct"):
        per_row = {e: [sum(line[key]) / 16 for line in read(folder / "predictions.jsonl")]
                   for e, (_, folder) in sampled.items()}
        diffs = [a - b for a, b in zip(per_row["hf"], per_row["vllm"])]
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        assert 0.05 < sum(per_row["vllm"]) / len(diffs) < 0.95, key  # neither all right nor all wrong
        assert abs(mean) <= 4 * se + 1e-9, (key, mean, se)
    for e, (results, folder) in sampled.items():
        lines = read(folder / "predictions.jsonl")
        assert len(lines) == 24 and all(len(line["responses"]) == 16 for line in lines), e
        assert all("pass@16" in b and "maj@16" in b for b in evaluate.benchmarks_of(results).values())
    hf_format = sum(b["format_rate"] for b in evaluate.benchmarks_of(sampled["hf"][0]).values()) / 3
    vl_format = sum(b["format_rate"] for b in evaluate.benchmarks_of(sampled["vllm"][0]).values()) / 3
    assert abs(hf_format - vl_format) < 0.15, (hf_format, vl_format)


def first_token_probabilities(model, processor, rows, never, temperature, top_p):
    """The exact distribution of the first sampled token under HF's settings: suppressed ids at -inf,
    logits / T, then top_p as transformers' TopPLogitsWarper cuts it (the smallest set of the most
    likely tokens whose mass reaches top_p)."""
    texts, images = reward.chat_prompts(processor, rows)
    inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1].double()
    raw = torch.softmax(logits, -1)
    logits[:, never] = -math.inf
    probs = torch.softmax(logits / temperature, -1)
    ordered, index = probs.sort(-1)
    drop = ordered.cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    probs = probs.scatter(-1, index, ordered.masked_fill(drop, 0.0))
    return probs / probs.sum(-1, keepdim=True), raw[:, never].sum(-1)


def chi_square_z(counts: list[int], probs: list[float]) -> float:
    """Pearson's chi-square of counts against probabilities, as a z score (Wilson-Hilferty), with
    the categories expected fewer than 5 times pooled into one."""
    total = sum(counts)
    big = [(c, p * total) for c, p in zip(counts, probs) if p * total >= 5]
    rest = (total - sum(c for c, _ in big), total - sum(e for _, e in big))
    cells = big + ([rest] if rest[1] >= 1 else [])
    stat = sum((c - e) ** 2 / e for c, e in cells)
    df = len(cells) - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def test_first_token_follows_hf_distribution_and_suppressed_ids_never_appear(vllm, base_dir, toy_data_dir,
                                                                             tmp_path):
    """The sampler itself, token by token: 2,000 first tokens of a text and an image prompt, drawn by
    vLLM with engine.vllm_sampling's translation of reward.generation_kwargs (T 1.0, top_p 0.9),
    against the exact distribution of an HF forward pass. The model is the random tiny32 with its
    matrices redrawn at std 0.3 (first-token entropy about 4 nats: some 30 tokens are drawn 5 times
    or more), its output embedding untied and its rows of the suppressed ids (vision specials,
    <|im_start|>) set so that unsuppressed they would take most of the mass: they must never be
    drawn, and what is drawn must follow HF's renormalised distribution (chi-square z < 3.1, p about
    0.001; deterministic for the fixed seeds)."""
    processor = AutoProcessor.from_pretrained(base_dir)
    processor.tokenizer.padding_side = "left"  # logits[:, -1] is every prompt's last token
    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3, generator=generator)
    model.config.tie_word_embeddings = model.config.get_text_config().tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    never = reward.never_generate_ids(processor.tokenizer)
    stored = datasets.load_from_disk(toy_data_dir)["test"].with_format("arrow")
    rows = [reward.check_row(row, toy_data_dir) for row in stored[list(range(len(stored)))].to_pylist()]
    rows = [next(r for r in rows if not r.get("images")), next(r for r in rows if r.get("images"))]
    with torch.no_grad():  # the rows of the suppressed ids: the most likely first token's, scaled up
        head = model.lm_head.weight
        texts, images = reward.chat_prompts(processor, rows)
        inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        top = model(**inputs).logits[:, -1].argmax(-1)
        head[never] = 4.0 * head[top].mean(0)
    folder = tmp_path / "boosted"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    temperature, top_p, n = 1.0, 0.9, 1000
    probs, raw_never = first_token_probabilities(model, processor, rows, never, temperature, top_p)
    assert (raw_never > 0.5).all(), raw_never  # the suppression is really tested

    llm = vllm.LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=512,
                   enable_chunked_prefill=False, max_num_batched_tokens=8192, gpu_memory_utilization=0.9)
    gen_kwargs = reward.generation_kwargs(temperature, top_p, 1, never)
    params = engines.vllm_sampling(gen_kwargs, n, llm.llm_engine.model_config.get_vocab_size(),
                                   engines.end_of_turn_ids(str(folder)))
    assert params["top_k"] == 0 and params["repetition_penalty"] == 1.0 and params["max_tokens"] == 1
    prompts = [{"prompt": t, **({"multi_modal_data": {"image": r["images"]}} if r.get("images") else {})}
               for t, r in zip(texts, rows)]
    outputs = llm.generate(prompts, [vllm.SamplingParams(**params, seed=s) for s in (11, 12)], use_tqdm=False)
    for row_probs, output in zip(probs, outputs):
        tokens = [c.token_ids[0] for c in output.outputs]
        assert len(tokens) == n and not set(tokens) & set(never)
        counts = torch.bincount(torch.tensor(tokens), minlength=len(row_probs)).tolist()
        assert all(c == 0 for c, p in zip(counts, row_probs.tolist()) if p == 0)  # top_p's cut holds
        assert chi_square_z(counts, row_probs.tolist()) < 3.1
    del llm


def test_kill_and_resume_equals_uninterrupted_run(model_dir, toy_data_dir, sampled, tmp_path, monkeypatch):
    """A run killed after its second batch of 4 (two batches on disk, the third lost) and run again
    writes what the uninterrupted run wrote: vLLM's samples are seeded per row (evaluate.row_seed)."""
    reference, reference_dir = sampled["vllm"]
    calls, real = [], evaluate.generate_vllm

    def killed_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_vllm", killed_on_third_batch)
    settings = (*SAMPLED, "--batch_size", 4)
    with pytest.raises(KeyboardInterrupt):
        run(model_dir, toy_data_dir, tmp_path / "resumed", "vllm", *settings)
    assert len(read(tmp_path / "resumed" / "predictions.rank0.jsonl")) == 8
    monkeypatch.setattr(evaluate, "generate_vllm", real)
    resumed = run(model_dir, toy_data_dir, tmp_path / "resumed", "vllm", *settings)
    # Another batch size (16 in the reference), the same samples: a row's draws are its own.
    assert read(tmp_path / "resumed" / "predictions.jsonl") == read(reference_dir / "predictions.jsonl")
    assert resumed["results"] == reference["results"]
    assert not list((tmp_path / "resumed").glob("predictions.rank*.jsonl"))


def test_missing_vllm_names_the_install(model_dir, toy_data_dir, tmp_path, monkeypatch):
    """Without vLLM, --engine vllm stops with the make target to run, before any work."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(SystemExit, match="make install-vllm"):
        run(model_dir, toy_data_dir, tmp_path / "none", "vllm")
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------
# grpo.py --engine vllm: the rollouts from vLLM, its weights synced after every update
# ---------------------------------------------------------------------------------------------

GRPO_TOKENS = 96  # as TOKENS: the trained model's whole answer


def grpo_rows(data_dir: str, split: str = "train", n: int = 8) -> list[dict]:
    """The first n rows of a split, read as grpo.py reads them: image and text-only rows mixed."""
    stored = datasets.load_from_disk(data_dir)[split]
    rows = [reward.check_row(row, data_dir) for row in stored.select(range(n))]
    assert any(r.get("images") for r in rows) and not all(r.get("images") for r in rows)
    return rows


@pytest.fixture(scope="class")
def grpo_engine(vllm, model_dir, toy_data_dir):
    """engine.Engine with --engine vllm on the trained tiny32, as grpo.main sets it up."""
    from accelerate import Accelerator

    args = grpo.Args(data=toy_data_dir, model=model_dir, max_prompt_length=512, max_new_tokens=GRPO_TOKENS)
    dataset = datasets.load_from_disk(toy_data_dir)["train"]
    policy = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    engine = engines.Engine(engines.EngineArgs(engine="vllm"), Accelerator(), AutoProcessor.from_pretrained(model_dir),
                            policy, args.model, args.seed, args.max_prompt_length + args.max_new_tokens,
                            engines.max_images(dataset))
    yield engine
    # Shut down before the whole runs below: accelerate's end_training destroys the default process
    # group, which this engine's vLLM set up (grpo.main closes its engine first for the same reason).
    engine.close()


class TestGRPOEngine:
    """engine.Engine's vLLM (engine.VLLM) itself: one engine for these tests, shut down after them."""

    def test_logprobs_after_a_weight_sync_equal_the_policys(self, grpo_engine, model_dir, toy_data_dir):
        """After a sync, vLLM samples from the policy: the log-probs it gives its sampled tokens
        (processed_logprobs: after the temperature and the suppression) equal engine.completion_logprobs of
        the same tokens, the policy's forward pass that logp_old and the update use. The policy is the
        trained model with every weight moved by noise (std 0.02), so vLLM's copy of --model would not
        match it: pushed back to --model's weights, they differ by up to 5.5. fp32; measured largest
        difference over 16 completions of up to 96 tokens 2.5e-5 (the issue measured 9.5e-7 on the
        unperturbed model); the tolerance, 1e-4, is 4 times that and 50,000 times below what the
        unsynced copy gives."""
        from vllm import SamplingParams

        processor = AutoProcessor.from_pretrained(model_dir)
        policy = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        never = reward.never_generate_ids(processor.tokenizer)
        eos = policy.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        rows = grpo_rows(toy_data_dir)
        gen_kwargs = reward.generation_kwargs(1.0, 1.0, GRPO_TOKENS, never)
        llm = grpo_engine.vllm
        params = engines.vllm_sampling(gen_kwargs, 2, llm.vocab_size, eos)
        texts, _ = reward.chat_prompts(processor, rows)
        prompts = [{"prompt": t, **({"multi_modal_data": {"image": r["images"]}} if r.get("images") else {})}
                   for t, r in zip(texts, rows)]

        def sampled_logprobs():
            sampling = [SamplingParams(**params, seed=s, logprobs=0) for s in range(len(rows))]
            outputs = llm.llm.generate(prompts, sampling, use_tqdm=False)
            completions, logps = [], []
            for output in outputs:
                for c in sorted(output.outputs, key=lambda c: c.index):
                    completions.append((list(c.token_ids), not c.token_ids or c.token_ids[-1] not in eos))
                    logps.append(torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]))
            samples = grpo.build_samples(processor, rows, completions)
            batch = engines.collate(samples, processor.tokenizer.pad_token_id, "cpu")
            with torch.no_grad():
                mine = engines.completion_logprobs(policy, batch, 1.0, never)
            return max((mine[i, :len(lp)] - lp).abs().max().item() for i, lp in enumerate(logps))

        llm.sync(policy.state_dict().items())
        assert sampled_logprobs() < 1e-4
        start = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        llm.sync(start.state_dict().items())  # vLLM back on --model's weights: the policy's log-probs differ
        assert sampled_logprobs() > 0.1


    def test_rollouts_suppress_stop_at_the_first_end_and_are_seeded_per_prompt(self, grpo_engine, model_dir,
                                                                                     toy_data_dir):
        """Engine.rollout with vLLM: G completions per row at [i G, (i + 1) G), each cut at its first
        end-of-turn token (which it ends with, unless truncated at max_new_tokens), no suppressed id in
        any, and a mixed image / text-only batch. Seeds are per prompt, from (--seed, step, position):
        the same step samples the same completions again (a resumed run), another step other ones."""
        processor = AutoProcessor.from_pretrained(model_dir)
        policy = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        never = reward.never_generate_ids(processor.tokenizer)
        eos = grpo_engine.eos_ids
        rows, G, tokens = grpo_rows(toy_data_dir), 4, 48  # 48 tokens: some completions are truncated
        args = grpo.Args(data=toy_data_dir, group_size=G, max_new_tokens=tokens)
        grpo_engine.vllm.version = None  # as if vLLM's copy were older than the policy's step 3
        run = lambda step: grpo_engine.rollout(policy, rows, G, grpo.sampling_kwargs(args, never), 8,
                                               seed=(args.seed, step), version=step)
        completions = run(3)
        assert grpo_engine.vllm.version == 3  # pushed before sampling
        assert len(completions) == len(rows) * G
        ended = truncated = 0
        for ids, cut in completions:
            assert not set(ids) & set(never)
            assert not set(ids[:-1]) & set(eos)  # nothing after the first end-of-turn
            if cut:
                assert len(ids) == tokens and ids[-1] not in eos
                truncated += 1
            else:
                assert ids[-1] in eos
                ended += 1
        assert ended and truncated, (ended, truncated)
        assert run(3) == completions
        assert run(4) != completions
        greedy = reward.generation_kwargs(0, 1.0, tokens, never)  # validation's rollouts
        first = grpo_engine.rollout(policy, rows, 1, greedy, 8)
        assert len(first) == len(rows) and first == grpo_engine.rollout(policy, rows, 1, greedy, 8)


@pytest.mark.slow
def test_grpo_steps_with_vllm_learn_like_hf(vllm, model_dir, toy_data_dir, tmp_path):
    """12 GRPO steps (2 epochs of the 48 training rows, 8 prompts x 8 samples, lr 1e-4) of the trained
    tiny32 through each engine. The engines draw other samples, so the runs differ; but each step's
    prompts are the same and the update is the same code, so the per-step rewards must agree in
    distribution: their paired mean difference lies within 4 standard errors (as the pass-count test
    above), and so do the format rates. Measured: per-step rewards 0.02-0.34 along both runs, means
    0.186 (hf) and 0.178 (vllm), paired difference 0.4 standard errors; format rates 0.52 and 0.48,
    2.1 standard errors. Greedy validation on 8 rows is too coarse to compare (the two policies are
    trained on other samples: 0.375 at the start, 0.375 and 0.0 after 12 steps, and HF generate
    gives the vLLM-trained weights the same 0.0); it is only checked to run."""
    def train(engine):
        out = tmp_path / engine
        grpo.main(["--engine", engine, "--model", model_dir, "--data", toy_data_dir, "--output_dir", str(out),
                   "--rollout_batch_size", "8", "--mini_batch_size", "8", "--group_size", "8",
                   "--max_new_tokens", str(GRPO_TOKENS), "--learning_rate", "1e-4", "--max_steps", "12",
                   "--save_steps", "0", "--save_final", "False", "--max_prompt_length", "512",
                   "--beta", "0", "--micro_batch_size", "64", "--gradient_checkpointing", "False",
                   "--eval_every", "12", "--eval_limit", "8"])
        return [json.loads(line) for line in open(out / "metrics.jsonl")]

    syncs = []
    real_sync = engines.VLLM.sync

    def counted_sync(self, model):
        syncs.append(1)
        return real_sync(self, model)

    engines.VLLM.sync = counted_sync
    try:
        runs = {engine: train(engine) for engine in ("hf", "vllm")}
    finally:
        engines.VLLM.sync = real_sync
    # Once at the start (vLLM loaded --model; a resumed run's policy is a checkpoint's), then after each
    # of the 12 updates, before what samples next: steps 2 to 12 and the final validation.
    assert len(syncs) == 1 + 12
    for key in ("reward", "format_rate"):
        per_step = {e: [r[key] for r in m if "reward" in r] for e, m in runs.items()}
        assert len(per_step["hf"]) == len(per_step["vllm"]) == 12
        diffs = [a - b for a, b in zip(per_step["hf"], per_step["vllm"])]
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        assert abs(mean) <= 4 * se + 1e-9, (key, per_step)
        assert 0 < sum(per_step["vllm"]) / 12 < 1, (key, per_step)
    for record in runs["vllm"]:
        if "reward" in record:
            assert not record["skipped"] and math.isfinite(record["loss"])
    assert "val_accuracy" in runs["vllm"][-1] and "val_accuracy" in runs["hf"][-1]


class StandInLLM:
    """vllm.LLM as engine.VLLM uses it, recording the calls: a CPU has no sleep mode to test with."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: 600),
                                          reset_encoder_cache=lambda: self.calls.append("reset_encoder_cache"))

    def collective_rpc(self, method, kwargs):
        assert len(list(kwargs["weights_iterator"])) == 2  # the policy's weight and bias
        self.calls.append(method)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level):
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up {tags}")

    def generate(self, prompts, sampling, use_tqdm):
        self.calls.append("generate")
        return [SimpleNamespace(outputs=[SimpleNamespace(index=j, token_ids=[5, 7]) for j in range(p.n)])
                for p in sampling]


@pytest.mark.parametrize("device,vllm_sleep", [("cuda", True), ("cuda", False), ("cpu", True)])
def test_grpo_vllm_sleeps_between_rollouts_on_a_gpu(vllm, monkeypatch, tiny_model_dir, toy_data_dir, device,
                                                    vllm_sleep):
    """--vllm_sleep on a GPU: the engine is built with sleep mode; after each rollout it sleeps at
    level 2 (weights and KV cache freed for the update); before the next it allocates its weights,
    receives the policy's (every rollout syncs: level 2 dropped them), allocates its KV cache, then
    samples. Without it, or on a CPU: no sleep, and a rollout with no update since the last one (the
    same version) does not sync. Against a stand-in for vllm.LLM: the order of the calls, not vLLM's
    GPU memory."""
    monkeypatch.setattr(vllm, "LLM", StandInLLM)
    with monkeypatch.context() as patch:  # the device engine.VLLM sees
        patch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
        engine = engines.VLLM(tiny_model_dir, "float32", 0, 512, 0.3,
                              engines.max_images(datasets.load_from_disk(toy_data_dir)["train"]), sleep=vllm_sleep)
    sleeps = device == "cuda" and vllm_sleep
    assert engine.llm.kwargs["enable_sleep_mode"] is sleeps
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    gen_kwargs = reward.generation_kwargs(1.0, 1.0, 8, reward.never_generate_ids(processor.tokenizer))
    rows, policy = grpo_rows(toy_data_dir, n=3), list(torch.nn.Linear(2, 2).state_dict().items())
    for step in (1, 2):
        seeds = [reward.sampling_seed(0, step, i) for i in range(len(rows))]
        completions = engine.generate(processor, rows, 2, gen_kwargs, [7], seeds, policy=policy, version=0)
        assert completions == [([5, 7], False)] * 6
    sync = ["reload_weights", "reset_encoder_cache", "reset_prefix_cache"]
    if sleeps:
        assert engine.llm.calls == [*sync, "generate", "sleep 2",
                                    "wake_up ['weights']", *sync, "wake_up ['kv_cache']", "generate", "sleep 2"]
    else:
        assert engine.llm.calls == [*sync, "generate", "generate"]


def test_grpo_vllm_names_the_install(monkeypatch):
    """Without vLLM the run stops naming the make target, before any work (EngineArgs.check runs
    before the run folder is claimed)."""
    engines.EngineArgs(engine="vllm").check()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(SystemExit, match="make install-vllm"):
        engines.EngineArgs(engine="vllm").check()


def test_grpo_vllm_resumed_run_samples_the_same_completions(vllm, model_dir, toy_data_dir, tmp_path):
    """A run resumed from its step-1 checkpoint (a fresh engine, the checkpoint's weights pushed before
    the first rollout) computes step 2 as the uninterrupted run did: the same completions (their
    rewards, lengths) and so the same loss and gradient norm."""
    out = tmp_path / "run"
    argv = ["--engine", "vllm", "--model", model_dir, "--data", toy_data_dir, "--output_dir", str(out),
            "--rollout_batch_size", "8", "--mini_batch_size", "4", "--group_size", "4",
            "--max_new_tokens", str(GRPO_TOKENS), "--learning_rate", "1e-3", "--max_steps", "2",
            "--save_steps", "1", "--max_prompt_length", "512", "--beta", "0.01",
            "--gradient_checkpointing", "False", "--resume", "latest"]
    keys = ("reward", "format_rate", "completion_length", "truncated", "loss", "grad_norm", "entropy", "kl")
    grpo.main(argv)
    whole = [json.loads(line) for line in open(out / "metrics.jsonl")]
    shutil.rmtree(out / "final")  # as if killed after checkpoint-1: step 2 is computed again
    grpo.main(argv)
    resumed = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in resumed] == [1, 2]
    assert {k: resumed[1][k] for k in keys} == {k: whole[1][k] for k in keys}
    assert resumed[0] == whole[0]  # step 1's line is kept as it was


@pytest.mark.slow
def test_make_reproduce_3b_engine_vllm_runs_end_to_end(base_dir, toy_data_dir, tmp_path):
    """`make reproduce-3b ENGINE=vllm` on the toy world, as tests/test_recipes.py runs the HF twin:
    pass counts, the difficulty filter, GRPO and the evaluation, each generating stage through vLLM
    (every run.json / results.json records engine vllm), under this venv's python (VENV = sys.prefix:
    the Makefile's python is the one that has vLLM), each stage on 2 processes with an engine each
    (configs/cpu_2proc.yaml). Wiring only: the random tiny32 passes nothing, so MIN_PASS=0 keeps the
    rows."""
    launch = f"{sys.prefix}/bin/accelerate launch --config_file configs/cpu_2proc.yaml"
    out = subprocess.run(
        ["make", "--no-print-directory", "reproduce-3b", "ENGINE=vllm", f"VENV={sys.prefix}", f"LAUNCH={launch}",
         f"RUNS={tmp_path}", f"QWEN_3B={base_dir}", f"M23K={toy_data_dir}", f"EVAL_DATA={toy_data_dir}",
         "EVAL_SPLIT=test", "MIN_PASS=0",
         "PASS_ARGS=--n 2 --temperature 1.0 --max_new_tokens 4 --batch_size 16 --limit 16",
         "GRPO_ARGS=--rollout_batch_size 4 --mini_batch_size 2 --group_size 2 --max_new_tokens 4 "
         "--max_steps 1 --gradient_checkpointing False --micro_batch_size 8 --eval_every 0",
         "EVAL_ARGS=--max_new_tokens 4 --batch_size 24"],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("cpu_2proc.yaml") == 3  # pass counts, GRPO, evaluation
    run = tmp_path / "reproduce-3b"
    assert len(datasets.load_from_disk(str(run / "filtered"))) == 16
    for stage in ("passcounts", "eval-grpo"):
        assert json.loads((run / stage / "results.json").read_text())["config"]["model_backend"] == "vllm", stage
    assert json.loads((run / "grpo" / "run.json").read_text())["settings"]["engine"] == "vllm"
    assert len((run / "grpo" / "metrics.jsonl").read_text().splitlines()) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["grpo"]["benchmarks"]["ToyLesion"]["samples"] == 8
    assert "| 3B RL(m23k) (paper) | - | - | - | 0.5319 |" in out.stdout


# ---------------------------------------------------------------------------------------------
# One engine beside each process (accelerate launch, configs/cpu_2proc.yaml)
# ---------------------------------------------------------------------------------------------


def two_processes(script, *args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "cpu_2proc.yaml"), str(script), *map(str, args)]


def one_and_two_processes(script, flags: list, tmp_path) -> str:
    """`python SCRIPT FLAGS` into tmp_path/one, then the same under accelerate launch with 2
    processes into tmp_path/two; both must succeed. Returns the launched run's stdout."""
    single = subprocess.run([sys.executable, str(script), *map(str, flags), "--output_dir", str(tmp_path / "one")],
                            env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = subprocess.run(two_processes(script, *flags, "--output_dir", tmp_path / "two"),
                              env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-3000:]
    return launched.stdout


def grpo_vllm_flags(model_dir, data_dir) -> list[str]:
    """3 steps of 4 prompts x 4 samples, 2 optimizer steps each, validation at steps 0 and 3, a
    checkpoint at step 2 (the tests of 2 processes against one)."""
    return ["--engine", "vllm", "--model", model_dir, "--data", data_dir, "--max_steps", "3",
            "--eval_every", "3", "--eval_split", "train", "--eval_limit", "3", "--eval_batch_size", "2",
            "--rollout_batch_size", "4", "--group_size", "4", "--mini_batch_size", "2",
            "--generation_batch_size", "2", "--max_new_tokens", str(GRPO_TOKENS), "--max_prompt_length", "512",
            "--learning_rate", "1e-3", "--gradient_checkpointing", "False", "--save_steps", "2"]


@pytest.mark.slow
def test_grpo_vllm_two_processes_equal_one_and_resume(model_dir, toy_data_dir, tmp_path):
    """grpo.py --engine vllm under accelerate launch with 2 processes, an engine in each: every
    rollout (3 steps, validation at steps 0 and 3), every metric and the final weights equal one
    process's, bit for bit. Why exact: a prompt's G samples come from its own generator, seeded
    from (run seed, step, its position), whichever process and engine draws them, and on this CPU a
    request's logits do not depend on the other requests of its engine's batch (the one process's
    engine takes 4 prompts at once, each of two processes 2). The update is exact as in
    tests/test_grpo.py (1 process at --micro_batch_size 4, 2 at 8). Then the 2-process run killed
    after its step-2 checkpoint resumes (each engine given the checkpoint's weights) to the same
    weights."""
    common = grpo_vllm_flags(model_dir, toy_data_dir)
    (tmp_path / "recorder.py").write_text(RECORDER)
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, str(tmp_path / "recorder.py"), str(tmp_path / "one_rollouts"),
                             "--output_dir", one, *common, "--micro_batch_size", "4"],
                            env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = subprocess.run(two_processes(tmp_path / "recorder.py", tmp_path / "two_rollouts", "--output_dir", two,
                                            *common, "--micro_batch_size", "8"),
                              env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-3000:]
    with open(tmp_path / "one_rollouts.0") as f:
        rollouts = json.load(f)
    assert len(rollouts) == 3 + 2 and len(rollouts[1]) == 16  # 3 steps of 4 x 4, 2 validations
    for rank in (0, 1):
        with open(tmp_path / f"two_rollouts.{rank}") as f:
            assert json.load(f) == rollouts, rank
    timing = ("time_", "tokens_per_s", "generate_tokens_per_s", "mfu", "peak_memory_gb")
    metrics = [[{k: v for k, v in json.loads(line).items() if not k.startswith(timing)}
                for line in open(run / "metrics.jsonl")] for run in (one, two)]
    assert metrics[0] == metrics[1] and [m["step"] for m in metrics[0]] == [0, 1, 2, 3]
    assert any(0 < m.get("reward", 0) < 1 for m in metrics[0])  # groups with a signal: the update is tested
    w1, w2 = (load_file(run / "final" / "model.safetensors") for run in (one, two))
    w0 = load_file(os.path.join(model_dir, "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and any(not torch.equal(w0[k], w1[k]) for k in w0)
    # Killed after checkpoint-2: step 3 again, on 2 processes.
    shutil.rmtree(two / "final")
    resumed = subprocess.run(two_processes(ROOT / "grpo.py", "--output_dir", two, *common, "--micro_batch_size", "8",
                                           "--resume", "latest"),
                             env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    w3 = load_file(two / "final" / "model.safetensors")
    assert all(torch.equal(w1[k], w3[k]) for k in w1)


# Counts what each VLLM.sync takes: the (name, tensor) pairs, and the DTensor all-gathers during the
# sync; written to SYNCS.<RANK> after the run (prefixed to test_fsdp.LAUNCHER).
SYNC_COUNTER = r"""
import atexit, json, os
from torch.distributed.tensor import DTensor
import engine

full_tensor, sync, syncs = DTensor.full_tensor, engine.VLLM.sync, []

def counted_sync(self, weights):
    counts = {"pairs": 0, "gathers": 0}
    def gather(tensor, *args, **kwargs):
        counts["gathers"] += 1
        return full_tensor(tensor, *args, **kwargs)
    def pairs():
        for pair in weights:
            counts["pairs"] += 1
            yield pair
    DTensor.full_tensor = gather
    try:
        sync(self, pairs())
    finally:
        DTensor.full_tensor = full_tensor
    syncs.append(counts)

engine.VLLM.sync = counted_sync
atexit.register(lambda: json.dump(syncs, open(os.environ["SYNCS"] + "." + os.environ.get("RANK", "0"), "w")))
"""


@pytest.fixture(scope="module")
def image_in_every_pair(toy_data_dir, tmp_path_factory) -> str:
    """Three image questions and a text one: every mini-batch of 2 prompts holds an image, so every
    optimizer step trains the vision tower on one process and on two (docs/real_path.md section 5:
    under FSDP a step without any image steps the tower with the dummy image's zero gradient, where
    one process has none)."""
    out = str(tmp_path_factory.mktemp("image_in_every_pair"))
    train = datasets.load_from_disk(toy_data_dir)["train"]
    images = [i for i, row in enumerate(train) if row["images"]]
    text = [i for i, row in enumerate(train) if not row["images"]]
    datasets.DatasetDict({"train": train.select(images[:3] + text[:1])}).save_to_disk(out)
    return out


@pytest.mark.slow
def test_grpo_vllm_under_fsdp2_equals_one_process_and_resumes(model_dir, image_in_every_pair, tmp_path):
    """grpo.py --engine vllm under FSDP2 on 2 CPU processes (test_fsdp.py's launcher, configs/fsdp.yaml
    in fp32), against one process, with the KL term on (--beta 0.01, the default):

    - each sync all-gathers every tensor of the policy once (DTensor.full_tensor, one at a time),
      never inside decoding (vLLM decodes from its own copy); the tied embedding once, given under
      both its names, which vLLM's loader reads;
    - every rollout token for token, on both processes, every metric but the gradient norm (FSDP sums
      the squares of its shards: 1e-7 apart), and the weights after every checkpoint, bit for bit;
    - killed after its step-2 checkpoint (sharded), the resumed run ends on the same weights;
    - FSDP v1 is refused in one line, before the output folder is claimed."""
    import test_fsdp

    common = grpo_vllm_flags(model_dir, image_in_every_pair)
    (tmp_path / "recorder.py").write_text(SYNC_COUNTER + RECORDER)
    (tmp_path / "launcher.py").write_text(SYNC_COUNTER + test_fsdp.LAUNCHER)
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, str(tmp_path / "recorder.py"), str(tmp_path / "one_rollouts"),
                             "--output_dir", one, *common, "--micro_batch_size", "4"],
                            env=dict(run_env(), SYNCS=str(tmp_path / "one_syncs")), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    config = test_fsdp.cpu_config(tmp_path)
    test_fsdp.launch(tmp_path, config, "grpo", "--output_dir", two, *common, "--micro_batch_size", "8",
                     env={"RECORD": str(tmp_path / "two_rollouts"), "SYNCS": str(tmp_path / "two_syncs")},
                     timeout=300, launcher=tmp_path / "launcher.py")
    # Syncs: versions 0 (validation, step 1), 1, 2, 3 (validation). 57 names, 56 tensors: the
    # output layer is the embedding.
    state = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict(keep_vars=True)
    names, tensors = len(state), len({id(tensor) for tensor in state.values()})
    assert (names, tensors) == (57, 56)
    with open(tmp_path / "one_syncs.0") as f:
        assert json.load(f) == [{"pairs": names, "gathers": 0}] * 4
    for rank in (0, 1):
        with open(tmp_path / f"two_syncs.{rank}") as f:
            assert json.load(f) == [{"pairs": names, "gathers": tensors}] * 4, rank
    with open(tmp_path / "one_rollouts.0") as f:
        rollouts = json.load(f)
    assert len(rollouts) == 3 + 2 and len(rollouts[1]) == 16
    for rank in (0, 1):
        with open(tmp_path / f"two_rollouts.{rank}") as f:
            assert json.load(f) == rollouts, rank
    timing = ("time_", "tokens_per_s", "generate_tokens_per_s", "mfu", "peak_memory_gb", "grad_norm")
    runs = [[json.loads(line) for line in open(run / "metrics.jsonl")] for run in (one, two)]
    assert [m["step"] for m in runs[1]] == [0, 1, 2, 3] and runs[0][1]["kl"] > 0
    assert any(0 < m.get("reward", 0) < 1 for m in runs[0])  # groups with a signal: the update is tested
    for a, b in zip(*runs, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(timing)} == \
               {k: v for k, v in b.items() if not k.startswith(timing)}
        assert math.isclose(a.get("grad_norm", 0), b.get("grad_norm", 0), rel_tol=1e-6)
    w0 = load_file(os.path.join(model_dir, "model.safetensors"))
    for folder in ("checkpoint-2", "final"):
        a, b = (load_file(run / folder / "model.safetensors") for run in (one, two))
        assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(w0[k], a[k]) for k in a), folder
    shutil.rmtree(two / "final")
    test_fsdp.launch(tmp_path, config, "grpo", "--output_dir", two, *common, "--micro_batch_size", "8",
                     "--resume", "latest", timeout=300)
    a, b = (load_file(run / "final" / "model.safetensors") for run in (one, two))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # FSDP v1: its flat parameters carry wrapper names, and vLLM needs the model's own.
    refused = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                              test_fsdp.cpu_config(tmp_path, 1), str(tmp_path / "launcher.py"), "grpo",
                              "--output_dir", tmp_path / "v1", *common, "--micro_batch_size", "8"],
                             env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and engines.FSDP1_REFUSED in refused.stderr and not (tmp_path / "v1").exists()
    # accelerate's launcher prints its own traceback when a process fails; none comes from ours.
    assert not any(f'File "{ROOT / name}"' in refused.stderr for name in ("grpo.py", "engine.py", "runtime.py"))


@pytest.mark.slow
def test_evaluate_vllm_two_processes_give_one_process_predictions(model_dir, toy_data_dir, tmp_path):
    """evaluate.py --engine vllm under accelerate launch with 2 processes: batches dealt round robin,
    each process's engine answers its own, the parts merged; the greedy predictions.jsonl equals one
    process's byte for byte."""
    flags = ["--engine", "vllm", "--model", model_dir, "--data", toy_data_dir, "--split", "test",
             "--max_new_tokens", TOKENS, "--batch_size", 8]
    launched = one_and_two_processes(ROOT / "evaluate.py", flags, tmp_path)
    assert "rank 1: 8 rows" in launched  # 3 batches of 8: rank 0 answers two, rank 1 one
    one, two = ((tmp_path / run / "predictions.jsonl").read_bytes() for run in ("one", "two"))
    assert one == two and len(one.splitlines()) == 24


@pytest.mark.slow
def test_synth_generate_vllm_two_processes_write_what_one_does(base_dir, tmp_path):
    """synth.py generate --engine vllm under accelerate launch: each process's engine answers its own
    batches; the merged generated.jsonl equals one process's byte for byte."""
    import toy

    figures = tmp_path / "figures"
    toy.build_figures(toy.FiguresArgs(output_dir=str(figures), n=9)).save_to_disk(str(figures))
    flags = ["generate", "--engine", "vllm", "--model", base_dir, "--data", figures, "--max_new_tokens", 12,
             "--batch_size", 3]
    launched = one_and_two_processes(ROOT / "synth.py", flags, tmp_path)
    assert "rank 1: 3 answers" in launched  # 3 batches: rank 0 answers two, rank 1 one
    one, two = ((tmp_path / run / "generated.jsonl").read_bytes() for run in ("one", "two"))
    assert one == two and len(one.splitlines()) == 9
