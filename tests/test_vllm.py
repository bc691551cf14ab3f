"""evaluate.py --engine vllm: the same predictions as HF generate where they must be equal (greedy, fp32),
the same distribution where they cannot be (sampling), the same files, suppression and resuming.

vLLM is optional (`make install-vllm`, docs/vllm.md): without it this module is skipped. On a CPU its
attention needs a head size in {32, 64, 80, ...}, so the model is toy.py's `tiny32`, trained for 100
steps on the toy teacher's traces so that it writes the <think>/<answer> format and gets some
questions right (greedy accuracy 37.5 on the 24 test rows, about 15 at T 1.0): grades then mean
something.
"""

import importlib.util
import json
import math
import os

import datasets
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import evaluate
import reward
import toy

WHY_SKIPPED = "vLLM is optional and not installed: `make install-vllm` (docs/vllm.md) runs these tests"
# Decided without importing vLLM: its import takes about 11 s and sets up process-wide state (logging,
# torch settings), which the rest of the suite, collected in the same process, should not see.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason=WHY_SKIPPED)


@pytest.fixture(scope="module")
def vllm():
    """vLLM, imported when the first test here needs it, set up as evaluate.load_vllm sets it up:
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
    out = tmp_path_factory.mktemp("tiny32")
    model, processor = toy.build_model(toy.ModelArgs(output_dir=str(out), size="tiny32"))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


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
    assert results["vllm"]["benchmarks"] == results["hf"]["benchmarks"]
    assert results["hf"]["average"] > 20  # the model answers some questions right: grades are tested
    assert any("</answer>" in r for line in hf for r in line["responses"])
    # The same results.json, but for the engine in the settings (an HF run's stay as before --engine).
    assert results["vllm"]["config"].pop("engine") == "vllm" and "engine" not in results["hf"]["config"]
    assert set(results["vllm"]) == set(results["hf"])
    assert results["vllm"]["config"] == results["hf"]["config"]


def test_sampled_pass_counts_agree_in_distribution(sampled):
    """The two engines draw different samples (other generators) from one distribution: per row, the
    share of correct samples (what a pass count is made of) and of well-formed ones. The rows are
    the units (a row's 16 samples are not independent); the paired mean difference over 24 rows must
    lie within 4 standard errors. With the seeds fixed the test is deterministic; a correct sampler
    fails it for about 1 in 16,000 seed choices. A wrong temperature fails it: greedy scores 37.5
    here, sampling about 15, a difference of 10 standard errors."""
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
        assert all(f"pass@16" in b and "maj@16" in b for b in results["benchmarks"].values())
    hf_format = sum(b["format_rate"] for b in sampled["hf"][0]["benchmarks"].values()) / 3
    vl_format = sum(b["format_rate"] for b in sampled["vllm"][0]["benchmarks"].values()) / 3
    assert abs(hf_format - vl_format) < 15, (hf_format, vl_format)


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
    vLLM with evaluate.vllm_sampling's translation of reward.generation_kwargs (T 1.0, top_p 0.9),
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
    params = evaluate.vllm_sampling(gen_kwargs, n, llm.llm_engine.model_config.get_vocab_size(),
                                    evaluate.stop_ids(str(folder)))
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
    assert resumed["benchmarks"] == reference["benchmarks"]
    assert not list((tmp_path / "resumed").glob("predictions.rank*.jsonl"))


def test_missing_vllm_names_the_install(model_dir, toy_data_dir, tmp_path, monkeypatch):
    """Without vLLM, --engine vllm stops with the make target to run, before any work."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(SystemExit, match="make install-vllm"):
        run(model_dir, toy_data_dir, tmp_path / "none", "vllm")
    assert not (tmp_path / "none").exists()
