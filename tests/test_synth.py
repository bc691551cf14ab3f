"""synth.py, MedVLSynther's synthesis stage: the model steps on the toy model (they run, write as they
go, resume as if never stopped, and N processes write what one does), and selection on recorded
answers worked by hand, down to a training set grpo.py trains on. tests/test_synth_official.py
compares the parsing, scoring, rebalancing, the subset draw and the prompts with the official
functions on thousands of inputs."""

import json
import subprocess
import sys

import datasets
import pytest

import grpo
import reward
import synth
import toy
from conftest import ROOT, run_env

TOKENS = 12


@pytest.fixture(scope="module")
def figures_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("figures")
    toy.build_figures(toy.FiguresArgs(output_dir=str(out), n=10)).save_to_disk(str(out))
    return str(out)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def generate(model, figures, out, *flags):
    return synth.main(["generate", "--model", model, "--data", str(figures), "--output_dir", str(out),
                       "--max_new_tokens", str(TOKENS), "--batch_size", "3", *map(str, flags)])


# ---------------------------------------------------------------------------------------------
# The model steps on the toy model
# ---------------------------------------------------------------------------------------------


def test_generate_verify_select_run_end_to_end(tiny_model_dir, figures_dir, tmp_path):
    """What a tiny random model gives: text with no JSON object, every figure counted by reason."""
    generated = generate(tiny_model_dir, figures_dir, tmp_path / "gen")
    rows = lines(generated)
    figures = datasets.load_from_disk(figures_dir)
    assert [r["dataset_index"] for r in rows] == figures["dataset_index"]
    assert all(r["generator"] == "glm" and isinstance(r["generator_response"], str) for r in rows)
    assert rows[7]["caption"] == figures[7]["caption"] and "images" not in rows[0]  # fields but the images

    verified = synth.main(["verify", "--model", tiny_model_dir, "--data", str(generated), "--figures", figures_dir,
                           "--output_dir", str(tmp_path / "ver"), "--max_new_tokens", str(TOKENS)])
    # No question parsed, so the verifier is never asked (the official {"error": "missing_mcq"}).
    assert [r["verifier_response"] for r in lines(verified)] == [None] * 10

    summary = synth.main(["select", "--data", str(verified), "--figures", figures_dir,
                          "--output_dir", str(tmp_path / "sel")])
    assert summary["selected"] == 0 and summary["dropped"] == {"the generator's answer holds no JSON object": 10}
    scored = lines(tmp_path / "sel" / "scored.jsonl")
    assert all(r["generated_vqa"] is None and r["verify_score"] is None and r["verify_pass"] is False for r in scored)


def test_kill_and_resume_equals_uninterrupted_run(tiny_model_dir, figures_dir, tmp_path, monkeypatch):
    """Sampled answers (T 1.0), so a batch fed with other neighbours or another seed would differ."""
    sampled = ("--temperature", "1.0", "--generator", "qwen")
    whole = generate(tiny_model_dir, figures_dir, tmp_path / "whole", *sampled).read_bytes()
    calls, real = [], synth.answer

    def killed_in_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "answer", killed_in_third_batch)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        generate(tiny_model_dir, figures_dir, out, *sampled)
    part = out / "generated.rank0.jsonl"
    text = part.read_text()
    assert text.count("\n") == 6  # two batches of 3
    part.write_text(text[: text.rfind("\n", 0, len(text) - 1) + 30])  # killed while writing a line
    monkeypatch.setattr(synth, "answer", real)
    assert generate(tiny_model_dir, figures_dir, out, *sampled).read_bytes() == whole
    assert not list(out.glob("*.rank*"))
    with pytest.raises(SystemExit, match="holds another run .settings differ: temperature"):
        generate(tiny_model_dir, figures_dir, out, "--generator", "qwen")


@pytest.mark.slow
def test_two_processes_write_what_one_does(tiny_model_dir, figures_dir, tmp_path):
    one = generate(tiny_model_dir, figures_dir, tmp_path / "one", "--temperature", "1.0").read_bytes()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "synth.py"), "generate", "--model", tiny_model_dir, "--data", figures_dir,
               "--output_dir", str(tmp_path / "two"), "--max_new_tokens", str(TOKENS), "--batch_size", "3",
               "--temperature", "1.0"]
    done = subprocess.run(command, env=run_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1:" in done.stdout
    assert (tmp_path / "two" / "generated.jsonl").read_bytes() == one


def test_a_bad_figure_is_named_or_skipped(tiny_model_dir, figures_dir, tmp_path):
    good = datasets.load_from_disk(figures_dir).cast_column("images", datasets.List(datasets.Image(decode=False)))
    broken = good.map(lambda r, i: {"images": [{"bytes": b"not a png", "path": None}] if i == 4 else r["images"]},
                      with_indices=True)
    path = tmp_path / "figures"
    broken.save_to_disk(str(path))
    with pytest.raises(reward.RowError, match=r"1 bad figure\(s\); the first: figure dataset_index=4: image cannot be "
                                              r"decoded .*--on_bad_row skip"):
        generate(tiny_model_dir, path, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # refused before the folder is claimed
    generated = generate(tiny_model_dir, path, tmp_path / "skipped", "--on_bad_row", "skip")
    assert [r["dataset_index"] for r in lines(generated)] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert lines(tmp_path / "skipped" / "bad_rows.jsonl")[0]["dataset_index"] == 4


def test_the_qwen_chat_text_is_qwens_template_with_the_official_system_turn(tiny_model_dir):
    """One image: Qwen's hand-written text equals the chat template's with the script's system turn."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    for step, system in synth.QWEN_SYSTEM.items():
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
        expected = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert synth.chat_text(processor, "qwen", step, "Q?", 1) == expected
    # No image: the official empty vision block.
    assert "<|im_start|>user\n<|vision_start|><|vision_end|>Q?<|im_end|>" in synth.chat_text(processor, "qwen", "verify", "Q?", 0)


def test_the_verifier_sees_the_first_caption_only(figures_dir):
    figure = datasets.load_from_disk(figures_dir)[7]  # two images, one caption each
    mcq = {"question": "Q", "options": dict(zip("ABCDE", "abcde")), "answer": "A"}
    prompt = synth.verifier_prompt(figure, mcq, "qwen")
    assert f'CAPTION:\n\\"\\"\\"Image(s) Public Caption: {figure["caption"][0]}\\"\\"\\"' in prompt
    assert "[Image 2] Figure 8 shows" in prompt  # every image's context
    assert json.dumps(mcq, ensure_ascii=False) in prompt
    assert synth.verifier_prompt(figure, None, "qwen") is None
    generator = synth.generator_prompt(figure, "glm")
    assert f"[Image 1] {figure['caption'][0]}\n[Image 2] {figure['caption'][1]}" in generator


# ---------------------------------------------------------------------------------------------
# Selection on recorded answers
# ---------------------------------------------------------------------------------------------

ESSENTIAL = [{"title": t, "category": "Essential", "weight": 5, "score": 5} for t in synth.ESSENTIALS]
BONUS = [{"title": "Plausible Distractors", "category": "Important", "weight": 4, "score": 4},
         {"title": "Parallel Options", "category": "Important", "weight": 3, "score": 3},
         {"title": "Stem Concision", "category": "Optional", "weight": 2, "score": 2},
         {"title": "Clarity and Focus", "category": "Optional", "weight": 2, "score": 2},
         {"title": "Forbidden Terms", "category": "Pitfall", "weight": -2, "score": 0}]  # 35 + 11 = 46 points


def question(answer: str, n: int = 5) -> dict:
    return {"question": "Which finding is shown?", "options": {k: f"finding {k}" for k in "ABCDE"[:n]},
            "answer": answer}


def rubric(*, lose: int = 0, essential_lost: bool = False, lower_case: bool = False) -> dict:
    items = [dict(item) for item in ESSENTIAL + BONUS]
    if lower_case:
        items[0]["title"] = items[0]["title"].lower()
    if essential_lost:
        items[3]["score"] = 0
    if lose:  # an Optional item missed: 46 - 2 = 44 points of 46 = 0.9565, under 0.9670
        items[9]["score"] = 0
    return {"rubric": items}


def recorded_lines() -> list[tuple[dict, str | None]]:
    """(line, the reason select drops it or None) for figures 0-9, every answer as a model might write it."""
    fenced = lambda obj: "```json\n" + json.dumps(obj) + "\n```"  # noqa: E731
    return [
        ({"generator_response": fenced(question("C")), "verifier_response": json.dumps(rubric())}, None),
        ({"generator_response": "<think>hm</think><answer>" + json.dumps(question("C")) + "</answer>",
          "verifier_response": json.dumps(rubric(lower_case=True))}, None),  # titles match in any case
        ({"generator_response": json.dumps(question("C"))[:-1] + ",}",  # a trailing comma
          "verifier_response": "Here: " + json.dumps(rubric()) + " done"}, None),
        ({"generator_response": json.dumps(question("A")), "verifier_response": json.dumps(rubric(lose=2))},
         "rubric score under --min_score 0.967"),
        ({"generator_response": json.dumps(question("B")), "verifier_response": json.dumps(rubric(essential_lost=True))},
         "an essential rubric item is missing or not earned in full"),
        ({"generator_response": json.dumps(question("D")), "verifier_response": '{"error": "insufficient_evidence"}'},
         "the verifier answered an error (insufficient_evidence)"),
        ({"generator_response": "I cannot write a question.", "verifier_response": None},
         "the generator's answer holds no JSON object"),
        ({"generator_response": '{"question": "Q", "options": ["x", "y"], "answer": "A"}', "verifier_response": None},
         "the generator's JSON is not a question the official pipeline can store (options not an object of texts)"),
        ({"generator_response": json.dumps(question("E")), "verifier_response": "no rubric today"},
         "the verifier's answer holds no JSON object"),
        ({"generator_response": json.dumps(question("D", n=4)), "verifier_response": json.dumps(rubric())}, None),
    ]


def write_recorded(path, figures_dir) -> list:
    recorded = recorded_lines()
    figures = datasets.load_from_disk(figures_dir)
    with open(path, "w", encoding="utf-8") as f:
        for (line, _), index in zip(recorded, figures["dataset_index"]):
            f.write(json.dumps(dict(line, dataset_index=index, generator="glm", verifier="qwen")) + "\n")
    return recorded


def test_select_scores_filters_rebalances_and_feeds_grpo(figures_dir, tiny_model_dir, tmp_path):
    recorded = write_recorded(tmp_path / "verified.jsonl", figures_dir)
    summary = synth.main(["select", "--data", str(tmp_path / "verified.jsonl"), "--figures", figures_dir,
                          "--output_dir", str(tmp_path / "sel")])
    expected = {}
    for _, why in recorded:
        if why:
            expected[why] = expected.get(why, 0) + 1
    assert summary["dropped"] == expected and summary["selected"] == 4
    scored = lines(tmp_path / "sel" / "scored.jsonl")
    assert [r["dropped"] for r in scored] == [why for _, why in recorded]
    assert [r["verify_score"] for r in scored[:6]] == [1.0, 1.0, 1.0, 44 / 46, 41 / 46, None]
    assert [r["verify_pass"] for r in scored[:6]] == [True, True, True, True, False, False]

    # Four kept. Three can be relabelled (answers C, C, C; the four-option question cannot: its E is
    # None), so the targets are A1 B1 C1 D0 E0 and the three go to A, B, C (the largest gap first,
    # ties to the first letter). The first: old C -> new A, the other old letters A, B, D, E fill
    # B, C, D, E in order.
    train = datasets.load_from_disk(str(tmp_path / "sel" / "data"))["train"]
    assert train["answer_label"] == ["A", "B", "C", "D"] and train["dataset_index"] == [0, 1, 2, 9]
    first = json.loads(train[0]["options"])
    assert first == {"A": "finding C", "B": "finding A", "C": "finding B", "D": "finding D", "E": "finding E"}
    assert train[0]["answer"] == "finding C"
    # The four-option question: its E is "" (construct_trainset.py), its answer D stays D.
    assert json.loads(train[3]["options"])["E"] == "" and train[3]["answer"] == "finding D"
    figures = datasets.load_from_disk(figures_dir)
    assert train[2]["images"][0].tobytes() == figures[2]["images"][0].tobytes()
    for row in train:
        reward.check_row(row)

    # A subset balanced over the letters, drawn with seed 42 (--data: the verify step's folder).
    summary = synth.main(["select", "--data", str(tmp_path), "--figures", figures_dir,
                          "--output_dir", str(tmp_path / "sub"), "--subset", "2"])
    assert summary["selected"] == 2 and summary["dropped"]["not drawn into the --subset"] == 2
    assert sorted(datasets.load_from_disk(str(tmp_path / "sub" / "data"))["train"]["answer_label"]) == ["A", "B"]

    # What select writes is what grpo.py trains on.
    grpo.main(["--model", tiny_model_dir, "--data", str(tmp_path / "sel" / "data"), "--output_dir",
               str(tmp_path / "grpo"), "--rollout_batch_size", "2", "--mini_batch_size", "2", "--group_size", "2", "--micro_batch_size", "2",
               "--max_new_tokens", "8", "--max_steps", "1", "--gradient_checkpointing", "False"])
    assert (tmp_path / "grpo" / "final" / "model.safetensors").exists()


def test_select_without_a_verifier_and_in_pmc_style(figures_dir, tmp_path):
    """The no-verify set: only the parse decides. The PMC-style set: four letters, A-D balanced."""
    figures = datasets.load_from_disk(figures_dir)
    path = tmp_path / "generated.jsonl"
    answers = "AAAAAADDDD"
    with open(path, "w", encoding="utf-8") as f:
        for index, answer in zip(figures["dataset_index"], answers):
            f.write(json.dumps({"dataset_index": index, "generator": "glm_pmc",
                                "generator_response": json.dumps(question(answer, n=4))}) + "\n")
    summary = synth.main(["select", "--data", str(path), "--figures", figures_dir, "--output_dir",
                          str(tmp_path / "sel"), "--verified", "False"])
    assert summary["selected"] == 10 and summary["answer_letters"] == {"A": 3, "B": 3, "C": 2, "D": 2}
    train = datasets.load_from_disk(str(tmp_path / "sel" / "data"))["train"]
    assert all(sorted(json.loads(o)) == ["A", "B", "C", "D"] for o in train["options"])  # no null E


def test_select_names_what_is_wrong_in_one_line(figures_dir, tmp_path):
    path = tmp_path / "verified.jsonl"
    path.write_text(json.dumps({"dataset_index": 0, "generator_response": "{}"}) + "\n")
    with pytest.raises(ValueError, match=r"verified.jsonl line 1: no verifier_response \(written by synth.py"):
        synth.main(["select", "--data", str(path), "--figures", figures_dir, "--output_dir", str(tmp_path / "a")])
    path.write_text(json.dumps({"dataset_index": 99, "generator_response": json.dumps(question("A")),
                                "verifier_response": json.dumps(rubric())}) + "\n")
    with pytest.raises(ValueError, match="dataset_index 99 is not a figure of"):
        synth.main(["select", "--data", str(path), "--figures", figures_dir, "--output_dir", str(tmp_path / "b")])
    # A step's folder stands for its file; a missing file is named, with the way out.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/verified.jsonl: no such file .*select --verified False reads"):
        synth.main(["select", "--data", str(tmp_path / "empty"), "--figures", figures_dir, "--output_dir",
                    str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="give --figures"):
        synth.main(["verify", "--data", str(path), "--model", "m", "--output_dir", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="the first argument is the step"):
        synth.main(["--data", str(path)])


def test_a_caption_that_is_not_a_list_is_refused(figures_dir, tmp_path):
    """One string per figure would be read one character per image (as the official scripts would)."""
    figures = datasets.load_from_disk(figures_dir)
    flat = figures.map(lambda r: {"flat": r["caption"][0]}).remove_columns("caption").rename_column("flat", "caption")
    flat.save_to_disk(str(tmp_path / "flat"))
    (tmp_path / "any.jsonl").write_text(json.dumps({"dataset_index": 0, "generator_response": "{}"}) + "\n")
    with pytest.raises(ValueError, match=r"column 'caption' must be a list of strings \(one per image\)"):
        synth.main(["select", "--data", str(tmp_path / "any.jsonl"), "--figures", str(tmp_path / "flat"),
                    "--output_dir", str(tmp_path / "out"), "--verified", "False"])
