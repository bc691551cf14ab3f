"""evaluate.py: batched greedy equals a naive loop, grading by the official rules, files split on
"\\n" only, resume, two processes, bad rows, empty data, changed data, image paths."""

import io
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from datetime import datetime

import datasets
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import engine
import evaluate
import reward
from conftest import ROOT, run_env

TOKENS = 16  # new tokens per response: enough to tell responses apart, cheap on CPU


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with its matrices redrawn at std 0.3, so that greedy responses differ from
    prompt to prompt (the freshly initialised one answers every prompt with newlines)."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3, generator=generator)
    out = tmp_path_factory.mktemp("diverse_model")
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def run(model_dir, data_dir, out, *extra):
    return evaluate.main(["--model", str(model_dir), "--data", str(data_dir), "--output_dir", str(out),
                          "--max_new_tokens", str(TOKENS), *map(str, extra)])


def without_time(results: dict) -> dict:
    return {k: v for k, v in results.items()
            if k not in ("date", "start_time", "end_time", "total_evaluation_time_seconds")}


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8", newline="\n")]


def listing(folder) -> list[tuple]:
    """Every file under a folder with its size and modification time."""
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.stat(os.path.join(d, f)).st_size,
                   os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, files in os.walk(folder) for f in files)


def save(rows: list[dict], features, folder) -> str:
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return str(folder)


def no_model_work(monkeypatch):
    fail = lambda *a, **k: pytest.fail("no model work may start")  # noqa: E731
    monkeypatch.setattr(evaluate, "load_model", fail)
    monkeypatch.setattr(evaluate, "generate", fail)


SAMPLED = ("--n", 2, "--temperature", 1.0, "--batch_size", 4, "--seed", 7)


@pytest.fixture(scope="module")
def sampled_reference(model_dir, toy_data_dir, tmp_path_factory):
    """An uninterrupted single-process sampled run: 24 rows in 6 batches of 4, 2 samples each."""
    out = tmp_path_factory.mktemp("sampled_reference")
    return out, run(model_dir, toy_data_dir, out, *SAMPLED)


@pytest.fixture(scope="module")
def test_split(toy_data_dir):
    return datasets.load_from_disk(toy_data_dir)["test"]


# --------------------------------------------------------------------------------------------
# Greedy: batching, left padding and ordering by length change nothing
# --------------------------------------------------------------------------------------------


def test_greedy_equals_one_row_at_a_time_generate(model_dir, toy_data_dir, tmp_path, capsys):
    results = run(model_dir, toy_data_dir, tmp_path, "--batch_size", 8)
    lines = read(tmp_path / "predictions.jsonl")
    progress = capsys.readouterr().err  # no stage sits silent: each pass over the rows shows a bar
    assert "checking rows: 100%" in progress and "measuring prompts: 100%" in progress

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    never = [processor.tokenizer.convert_tokens_to_ids(t) for t in reward.NEVER_GENERATE]
    test = datasets.load_from_disk(toy_data_dir)["test"]
    assert len(lines) == len(test) == 24
    assert any(row["images"] for row in test) and not all(row["images"] for row in test)
    for row, line in zip(test, lines):  # predictions.jsonl is in dataset order
        text = processor.apply_chat_template(reward.build_messages(row), add_generation_prompt=True,
                                             tokenize=False)
        inputs = processor(text=[text], images=row["images"] or None, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, suppress_tokens=never)
        response = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert (line["dataset_name"], line["dataset_index"]) == (row["dataset_name"], row["dataset_index"])
        assert line["prompt"] == text  # what the processor was given, before the image tokens expand
        assert line["responses"] == [response]
        assert line["preds"] == [reward.extract_answer(response)]
        graded = reward.is_correct(line["preds"][0], row["answer_label"], row["answer"])
        assert line["correct"] == [int(graded)]
        assert line["pass_correct"] == [int(reward.pass_correct(response, row["answer_label"], row["answer"]))]
    # Not vacuous: responses differ from row to row.
    assert len({line["responses"][0] for line in lines}) > 20
    assert set(evaluate.benchmarks_of(results)) == {"ToyHeartRate", "ToyFever", "ToyLesion"}
    assert all(b["samples"] == 8 for b in evaluate.benchmarks_of(results).values())
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_prompt_length_is_the_processors_token_count(model_dir, test_split):
    """Rows are ordered by prompt length; the image tokens are counted by the image processor."""
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = [row for row in test_split.select(range(6))]
    rows.append(dict(rows[2], images=[Image.new("RGB", (100, 37)), Image.new("RGB", (29, 300))]))
    assert sum(bool(row["images"]) for row in rows) == 3
    for row in rows:
        texts, images = reward.chat_prompts(processor, [row])
        expected = processor(text=texts, images=images or None, return_tensors="pt")["input_ids"].shape[1]
        assert engine.prompt_length(processor, row) == expected


# --------------------------------------------------------------------------------------------
# Grading: a hand-written predictions file, worked by hand
# --------------------------------------------------------------------------------------------

OPTIONS = {"A": "Asthma", "B": "Pneumonia", "C": "Bronchitis"}
HAND_LINES = [
    # X, row 1 (label B): B (reasoning names pneumonia -> consistent), A (names asthma -> consistent),
    # "Pneumonia" via the "answer is" fallback (no think text -> null; format fails). The pass-count
    # grade has no fallback: the whole text "The answer is Pneumonia" is wrong there.
    {"dataset_name": "X", "dataset_index": 1, "answer_label": "B", "answer": "Pneumonia",
     "options": json.dumps(OPTIONS),
     "responses": ["<think>crackles: asthma is unlikely, pneumonia</think>\n<answer>B</answer>",
                   "<think>wheeze means asthma</think><answer>A</answer>",
                   "The answer is Pneumonia"]},
    # X, row 2 (label A): C (names bronchitis last -> 1), "C. Bronchitis" (names asthma -> 0),
    # B (names asthma -> 0). Votes C, C, B -> C, wrong.
    {"dataset_name": "X", "dataset_index": 2, "answer_label": "A", "answer": "Asthma",
     "options": OPTIONS,
     "responses": ["<think>Asthma or bronchitis? BRONCHITIS</think><answer>C</answer>",
                   "<think>I say asthma</think><answer>C. Bronchitis</answer>",
                   "<think>asthma</think><answer>B</answer>"]},
    # Y: only the required fields. No options: the votes are the answers as they are, "b", "A",
    # "B. Pneumonia" tie at one vote each and the first seen, "b", wins; graded by is_correct: 1.
    {"dataset_name": "Y", "answer_label": "B", "answer": "Pneumonia",
     "responses": ["<answer>b</answer>", "answer: A", "<answer>B. Pneumonia</answer>"]},
    # Y: "A", "B", "C" tie; "A" is first seen and wrong. One of three correct: pass, not maj.
    {"dataset_name": "Y", "answer_label": "B", "answer": "Pneumonia", "responses": ["A", "B", "C"]},
]


def test_regrade_gives_hand_computed_metrics(tmp_path, capsys):
    source = tmp_path / "hand.jsonl"
    # As another tool might write it: no newline after the last line.
    source.write_text("\n".join(json.dumps(line) for line in HAND_LINES))
    results = evaluate.main(["--regrade", str(source), "--output_dir", str(tmp_path / "out")])

    lines = read(tmp_path / "out" / "predictions.jsonl")
    assert [line["preds"] for line in lines] == [["B", "A", "Pneumonia"], ["C", "C. Bronchitis", "B"],
                                                 ["b", "A", "B. Pneumonia"], ["A", "B", "C"]]
    assert [line["correct"] for line in lines] == [[1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0]]
    assert [line["pass_correct"] for line in lines] == [[1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 1, 0]]
    assert [line["consistent"] for line in lines] == [[1, 1, None], [1, 0, 0], [None] * 3, [None] * 3]
    # Every share a fraction 0-1, under lmms-eval's "<metric>,none" keys.
    x, y = results["results"]["X"], results["results"]["Y"]
    assert x["samples"] == 2 and y["samples"] == 2 and x["alias"] == " - X"
    assert x["accuracy,none"] == pytest.approx((2 / 3 + 0) / 2)  # mean over rows of the share correct
    assert x["maj@3,none"] == 0.5 and x["pass@3,none"] == 0.5
    assert x["format_rate,none"] == pytest.approx(5 / 6)
    assert x["consistency,none"] == pytest.approx(3 / 5)  # 1, 1 | 1, 0, 0 (the null left out)
    assert y["accuracy,none"] == pytest.approx(0.5) and y["maj@3,none"] == 0.5 and y["pass@3,none"] == 1.0
    assert y["format_rate,none"] == 0.0 and y["consistency,none"] is None
    # The paper's Avg is lmms-eval's group: unweighted over benchmarks, in results and in groups.
    avg = results["results"]["average"]
    assert avg["accuracy,none"] == pytest.approx((1 / 3 + 1 / 2) / 2) and avg["samples"] == 4
    assert results["groups"] == {"average": avg} and results["group_subtasks"] == {"average": ["X", "Y"]}
    # Standard errors over rows (the unit: a row's K responses are not independent): s / sqrt(n),
    # s with n - 1. X's rows score 2/3 and 0: s = sqrt(2 (1/3)^2 / 1), / sqrt(2) = 1/3. Y's: 2/3, 1/3.
    assert x["accuracy_stderr,none"] == pytest.approx(1 / 3) and y["accuracy_stderr,none"] == pytest.approx(1 / 6)
    assert x["maj@3_stderr,none"] == pytest.approx(0.5)  # 0/1 values: sqrt(p (1 - p) / (n - 1)), p = 1/2
    assert y["pass@3_stderr,none"] == 0.0  # both rows 1
    # The average's: sqrt(sum of the squared standard errors) / B.
    assert avg["accuracy_stderr,none"] == pytest.approx(math.hypot(1 / 3, 1 / 6) / 2)
    assert results["n-samples"] == {"X": {"original": 2, "effective": 2}, "Y": {"original": 2, "effective": 2}}
    assert results["configs"]["X"]["repeats"] == 3
    assert results["config"]["resolved_cli_args"] == {"regrade": str(source)}
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert results["git_hash"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert datetime.strptime(results["date"], "%Y%m%d_%H%M%S")  # lmms-eval's get_datetime_str format
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    assert results["skipped"] == {"count": 0, "rows": []}
    table = capsys.readouterr().out
    assert "| metric (0-1) | X | Y | Avg |" in table and "| maj@3 | 0.5000 | 0.5000 | 0.5000 |" in table
    assert "| accuracy_stderr | 0.3333 | 0.1667 | 0.1863 |" in table
    assert "| consistency | 0.6000 | - | 0.6000 |" in table

    # Regrading its own output changes nothing.
    again = evaluate.main(["--regrade", str(tmp_path / "out" / "predictions.jsonl"),
                           "--output_dir", str(tmp_path / "again")])
    other_source = {"config": None, "configs": None}  # they name the file graded
    assert without_time(again) | other_source == without_time(results) | other_source
    assert again["configs"]["X"] | {"dataset_path": None} == results["configs"]["X"] | {"dataset_path": None}
    # The same regrade again into its own folder is the same run; a changed file is another.
    evaluate.main(["--regrade", str(source), "--output_dir", str(tmp_path / "out")])
    source.write_text(json.dumps(HAND_LINES[3]) + "\n")
    with pytest.raises(SystemExit, match="holds another run"):
        evaluate.main(["--regrade", str(source), "--output_dir", str(tmp_path / "out")])

    source.write_text(json.dumps({"dataset_name": "X", "answer_label": "A", "answer": "x"}) + "\n")
    with pytest.raises(SystemExit, match="line 1"):
        evaluate.main(["--regrade", str(source), "--output_dir", str(tmp_path / "bad")])
    source.write_text(json.dumps(HAND_LINES[3]) + "\n{not json\n")
    with pytest.raises(SystemExit, match="line 2: not JSON"):
        evaluate.main(["--regrade", str(source), "--output_dir", str(tmp_path / "bad")])


def test_stderr_of_a_mean_of_0_1_values_is_sqrt_p_1_minus_p_over_n_minus_1():
    values = [1, 0, 0, 1, 1]
    assert evaluate.stderr(values) == pytest.approx(math.sqrt(0.6 * 0.4 / 4))
    assert evaluate.stderr([1]) is None and evaluate.stderr([]) is None
    assert evaluate.stderr_of_mean([3.0, 4.0]) == pytest.approx(2.5)  # sqrt(9 + 16) / 2
    assert evaluate.stderr_of_mean([3.0, None]) is None


def test_majority_vote_is_the_official_letter_vote():
    """regrade_eval_results.py: answers become letters where they name an option, the vote must be
    the label itself."""
    line = {"answer_label": "B", "answer": "Pneumonia", "options": OPTIONS}
    assert evaluate.majority_correct(dict(line, preds=["pneumonia", "B. Pneumonia", "A"])) == 1
    assert evaluate.majority_correct(dict(line, preds=["A", "C", "B"])) == 0  # first seen of a tie
    assert evaluate.majority_correct(dict(line, preds=["maybe", "maybe", "B"])) == 0  # no option


def test_consistency_reads_the_official_think_text():
    """The reasoning is reward.think_text: the first <think>...</think> block, or none."""
    options = {"A": "Pneumonia", "B": "Bacterial pneumonia", "C": "Asthma"}
    assert evaluate.option_named_last("not asthma: bacterial pneumonia", options) == "B"
    assert evaluate.option_named_last("bacterial pneumonia? No, viral: pneumonia.", options) == "A"
    assert evaluate.option_named_last("no option here", options) is None
    line = {"dataset_name": "X", "answer_label": "C", "answer": "Asthma", "options": options,
            "responses": ["<think>asthma</think> <think>pneumonia</think><answer>C</answer>",
                          "asthma, no opening tag</think><answer>C</answer>",
                          "<think>asthma, never closed <answer>C</answer>"]}
    assert evaluate.grade(line)["consistent"] == [1, None, None]


# --------------------------------------------------------------------------------------------
# Prediction files are split on "\n" only (U+2028, U+2029, U+0085 and "\r" stay in a response)
# --------------------------------------------------------------------------------------------

ODD = ["<think>line\u2028separator</think>\n<answer>B\u2029</answer>",  # U+2029 is whitespace: "B"
       "<think>next\u0085line</think><answer>A\rB</answer>",  # "\r" ends the answer's first line: "A"
       "answer: B\u2028C"]  # the marker's "(.*)" runs over U+2028 (only "\n" stops it): "B\u2028C"


def test_regrade_reads_a_file_written_with_ensure_ascii_false(tmp_path):
    ours = {"dataset_name": "X", "dataset_index": 1, "answer_label": "B", "answer": "Pneumonia",
            "options": OPTIONS, "responses": ODD}
    # The official run_offline_inference.py's line: responses in parsed_outputs, stripped, no options.
    official = {"dp_index": 0, "prompts": "p\u2028q", "dataset_name": "X", "dataset_index": 2,
                "answer_label": "A", "answer": "Asthma", "num_rollouts": 3, "num_correct": 1,
                "parsed_outputs": [{"output_text": text, "pred_letter": "?", "is_correct": False}
                                   for text in ODD]}
    written = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in (ours, official))
    # A third line as a Windows tool or a sloppy writer leaves it: a raw "\r" inside a string
    # (not valid JSON) and a "\r\n" line end.
    raw_cr = json.dumps(dict(ours, dataset_index=3, responses=["<answer>B\rA</answer>", "B", "C"]),
                        ensure_ascii=False)
    raw = (written + raw_cr.replace("\\r", "\r") + "\r\n").encode("utf-8")
    source = tmp_path / "official.jsonl"
    source.write_bytes(raw)
    assert "\u2028" in written and "\u0085" in written and len(raw.decode().splitlines()) > 3  # not vacuous

    results = evaluate.main(["--regrade", str(source), "--output_dir", str(tmp_path / "out")])
    lines = read(tmp_path / "out" / "predictions.jsonl")
    assert [line["dataset_index"] for line in lines] == [1, 2, 3]
    assert lines[0]["responses"] == lines[1]["responses"] == ODD  # every character kept
    assert lines[2]["responses"] == ["<answer>B\rA</answer>", "B", "C"]
    assert lines[0]["preds"] == ["B", "A", "B\u2028C"]
    assert lines[2]["preds"] == ["B", "B", "C"]
    for line in lines:  # the official rules of reward.py, on the exact strings
        label, answer = line["answer_label"], line["answer"]
        assert line["correct"] == [int(reward.is_correct(reward.extract_answer(r), label, answer))
                                   for r in line["responses"]]
        assert line["pass_correct"] == [int(reward.pass_correct(r, label, answer)) for r in line["responses"]]
    assert lines[0]["correct"] == [1, 0, 0] and lines[1]["correct"] == [0, 1, 0]
    assert lines[0]["pass_correct"] == [1, 0, 0] and lines[1]["pass_correct"] == [0, 0, 0]
    assert results["results"]["X"]["samples"] == 3


def fake_generate(model, processor, rows, n, gen_kwargs, seed, share_prompt=False):
    """Responses holding U+2028, U+2029, U+0085 and "\\r", a function of the batch seed and row."""
    rng = random.Random(seed)
    return [[f"<think>{row['dataset_index']}\u2028{rng.random():.3f}\u0085ok\r</think>\n"
             f"<answer>{rng.choice(list(reward.parse_options(row)))}\u2029</answer>" for _ in range(n)]
            for row in rows]


def test_resume_keeps_responses_with_line_separators(model_dir, toy_data_dir, tmp_path, monkeypatch):
    settings = ("--limit", 12, *SAMPLED)
    monkeypatch.setattr(evaluate, "generate", fake_generate)
    run(model_dir, toy_data_dir, tmp_path / "whole", *settings)
    calls = []

    def killed_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fake_generate(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", killed_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(model_dir, toy_data_dir, tmp_path / "resumed", *settings)
    part = tmp_path / "resumed" / "predictions.rank0.jsonl"
    text = part.read_text(encoding="utf-8")
    assert text.count("\n") == 8 and "\u2028" in text and "\u0085" in text
    # Killed while writing the last line, just after a U+2028 of it.
    part.write_text(text[: text.rfind("\u2028") + 1], encoding="utf-8")
    monkeypatch.setattr(evaluate, "generate", fake_generate)
    run(model_dir, toy_data_dir, tmp_path / "resumed", *settings)
    whole = (tmp_path / "whole" / "predictions.jsonl").read_bytes()
    assert (tmp_path / "resumed" / "predictions.jsonl").read_bytes() == whole
    assert "\u2029".encode() in whole


# --------------------------------------------------------------------------------------------
# Resuming and several processes give the uninterrupted single-process results
# --------------------------------------------------------------------------------------------


def test_kill_and_resume_equals_uninterrupted_run(model_dir, toy_data_dir, sampled_reference, tmp_path,
                                                  monkeypatch):
    reference_dir, reference = sampled_reference
    calls = []
    real_generate = evaluate.generate

    def killed_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", killed_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(model_dir, toy_data_dir, tmp_path, *SAMPLED)
    part = tmp_path / "predictions.rank0.jsonl"
    assert len(read(part)) == 8  # two batches of 4 rows
    # Killed in the middle of writing the second batch's last line: that row is not done, and
    # its batch must run again whole so that the other rows' neighbours stay the same.
    text = part.read_text()
    part.write_text(text[: text.rfind("\n", 0, len(text) - 1) + 40])
    monkeypatch.setattr(evaluate, "generate", real_generate)

    resumed = run(model_dir, toy_data_dir, tmp_path, *SAMPLED)
    assert without_time(resumed) == without_time(reference)
    assert (tmp_path / "predictions.jsonl").read_text() == (reference_dir / "predictions.jsonl").read_text()
    assert not list(tmp_path.glob("predictions.rank*"))
    assert resumed["results"]["ToyFever"]["pass@2,none"] >= resumed["results"]["ToyFever"]["maj@2,none"]

    # Everything done: a rerun generates nothing and gives the same results.
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("nothing left to generate"))
    assert without_time(run(model_dir, toy_data_dir, tmp_path, *SAMPLED)) == without_time(reference)
    # Other settings in the same folder are refused, before any work.
    with pytest.raises(SystemExit, match="holds another run .settings differ: seed"):
        run(model_dir, toy_data_dir, tmp_path, *SAMPLED[:-1], 8)


def test_two_processes_equal_one(model_dir, toy_data_dir, sampled_reference, tmp_path):
    reference_dir, reference = sampled_reference
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "evaluate.py"), "--model", model_dir, "--data", toy_data_dir,
               "--output_dir", str(tmp_path),
               "--max_new_tokens", str(TOKENS), *map(str, SAMPLED)]
    done = subprocess.run(command, env=run_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1:" in done.stdout  # both processes generated
    assert (tmp_path / "predictions.jsonl").read_text() == (reference_dir / "predictions.jsonl").read_text()
    assert without_time(json.loads((tmp_path / "results.json").read_text())) == without_time(reference)
    # Another seed into the same folder: the main process refuses, and the launcher stops the other
    # (waiting at the barrier) instead of leaving it there.
    command[command.index("--seed") + 1] = "8"
    done = subprocess.run(command, env=run_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0 and "holds another run (settings differ: seed)" in done.stderr


# --------------------------------------------------------------------------------------------
# The run folder: the same run resumes, a changed data set, model or setting is refused
# --------------------------------------------------------------------------------------------


def test_changed_data_or_model_at_the_same_path_is_refused(model_dir, test_split, tmp_path, monkeypatch):
    rows = test_split.select(range(4)).to_list()
    data = save(rows, test_split.features, tmp_path / "data")
    model = shutil.copytree(model_dir, tmp_path / "model")
    out = tmp_path / "out"
    first = run(model, data, out)
    assert json.loads((out / "run.json").read_text())["stage"] == "evaluate"

    no_model_work(monkeypatch)
    assert without_time(run(model, data, out)) == without_time(first)  # the same run: all reused
    # The same path, other labels: never graded against the saved (old) ones.
    shutil.rmtree(data)
    options = json.loads(rows[0]["options"])
    other = next(letter for letter in options if letter != rows[0]["answer_label"])
    save([dict(rows[0], answer_label=other, answer=options[other]), *rows[1:]], test_split.features, data)
    with pytest.raises(SystemExit, match="holds another run .data differ"):
        run(model, data, out)
    # A model saved again into the same folder is another model.
    shutil.rmtree(data)
    save(rows, test_split.features, data)
    os.utime(os.path.join(model, "config.json"))
    with pytest.raises(SystemExit, match="holds another run .model differ"):
        run(model, data, out)
    # A regrade never writes over a generation run's files.
    with pytest.raises(SystemExit, match="holds another run"):
        evaluate.main(["--regrade", str(out / "predictions.jsonl"), "--output_dir", str(out)])
    # A folder of something else is refused too.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a run folder"):
        run(model, data, tmp_path / "other")


# --------------------------------------------------------------------------------------------
# Bad input: every bad row named (an error by default), or skipped, counted and listed
# --------------------------------------------------------------------------------------------


def jpeg_bytes(size=(56, 56)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_bad_rows_are_named_and_counted(model_dir, test_split, tmp_path):
    rows = test_split.select(range(12)).to_list()  # ToyLesion rows are 2, 5, 8, 11
    options = json.loads(rows[3]["options"])
    faults = {
        0: dict(options="{A: not json"),
        1: dict(answer_label="D"),
        2: dict(images=[None]),
        3: dict(answer=options["C"] if rows[3]["answer_label"] != "C" else options["A"]),
        4: dict(question=None),
        5: dict(images=[{"bytes": b"not an image", "path": None}]),
        7: dict(dataset_name=rows[6]["dataset_name"], dataset_index=rows[6]["dataset_index"]),
        8: dict(images=[Image.new("RGB", (300, 1))]),  # Qwen2.5-VL's processor refuses it
        10: dict(question="   "),
        11: dict(images=[{"bytes": jpeg_bytes()[:300], "path": None}]),  # truncated JPEG
    }
    for i, change in faults.items():
        rows[i].update(change)
    data = save(rows, test_split.features, tmp_path / "data")
    before = listing(data)

    with pytest.raises(reward.RowError) as error:
        run(model_dir, data, tmp_path / "error")
    message = str(error.value)
    assert message.startswith(f"{len(faults)} bad row(s) of 12") and "--on_bad_row skip" in message
    for i in faults:
        assert f"dataset_name={rows[i]['dataset_name']!r} dataset_index={rows[i]['dataset_index']}" in message
    assert not (tmp_path / "error").exists()  # refused before the run folder is made

    results = run(model_dir, data, tmp_path / "skip", "--on_bad_row", "skip")
    assert results["skipped"]["count"] == len(faults)
    assert sorted(row["position"] for row in results["skipped"]["rows"]) == sorted(faults)
    listed = read(tmp_path / "skip" / "bad_rows.jsonl")
    assert [row["position"] for row in listed] == sorted(faults)
    assert sum(b["samples"] for b in evaluate.benchmarks_of(results).values()) == 2
    for name, counted in results["n-samples"].items():  # every row of the benchmark, graded or refused
        assert counted == {"original": sum(row["dataset_name"] == name for row in rows),
                           "effective": sum(rows[i]["dataset_name"] == name for i in (6, 9))}
    assert [line["dataset_index"] for line in read(tmp_path / "skip" / "predictions.jsonl")] == \
        [rows[6]["dataset_index"], rows[9]["dataset_index"]]
    assert listing(data) == before  # nothing written into the input folder (no cache-*.arrow)

    # Every row bad: an error, not a run with zero benchmarks.
    save([rows[i] for i in faults if i != 7], test_split.features, tmp_path / "all_bad")
    with pytest.raises(reward.RowError, match="all 9 rows are bad"):
        run(model_dir, tmp_path / "all_bad", tmp_path / "none", "--on_bad_row", "skip")
    assert not (tmp_path / "none").exists()


def test_empty_data_and_missing_columns_are_named_before_any_model_work(model_dir, test_split, tmp_path,
                                                                        monkeypatch):
    no_model_work(monkeypatch)
    empty = test_split.select([])
    cases = {tmp_path / "empty_saved": lambda p: empty.save_to_disk(str(p)),
             tmp_path / "empty.parquet": lambda p: empty.remove_columns("images").to_parquet(str(p)),
             tmp_path / "empty.jsonl": lambda p: p.write_text("")}
    for path, make in cases.items():
        make(path)
        with pytest.raises(ValueError, match="empty") as error:
            run(model_dir, path, tmp_path / "out")
        assert str(path) in str(error.value)
    with pytest.raises(ValueError, match="--limit 0 leaves no rows"):
        run(model_dir, save(test_split.to_list(), test_split.features, tmp_path / "full"),
            tmp_path / "out", "--limit", 0)
    no_answer = save(test_split.select(range(3)).remove_columns("answer").to_list(), None,
                     tmp_path / "no_answer")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answer'\]"):
        run(model_dir, no_answer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_image_file_paths_in_jsonl_and_parquet(model_dir, test_split, tmp_path, monkeypatch):
    """Paths relative to the data file's folder work from any working directory, and give the
    same responses as the images stored in a saved dataset."""
    rows = list(test_split.select(range(6)))  # images decoded (to_list would give the stored bytes)
    reference = run(model_dir, save(rows, test_split.features, tmp_path / "saved"), tmp_path / "ref")
    (tmp_path / "files" / "img").mkdir(parents=True)
    for row in rows:
        if row["images"]:
            name = f"img/{row['dataset_index']}.png"
            row["images"][0].save(tmp_path / "files" / name)
            row["images"] = [name]
    assert sum(bool(row["images"]) for row in rows) == 2
    jsonl = tmp_path / "files" / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    parquet = tmp_path / "files" / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    before = listing(tmp_path / "files")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    expected = [line["responses"] for line in read(tmp_path / "ref" / "predictions.jsonl")]
    for data in (jsonl, parquet):
        out = tmp_path / f"out_{data.suffix[1:]}"
        results = run(model_dir, data, out)
        assert [line["responses"] for line in read(out / "predictions.jsonl")] == expected
        assert results["results"] == reference["results"]
    assert listing(tmp_path / "files") == before

    rows[2]["images"] = ["img/missing.png"]
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(reward.RowError, match="image file not found: 'img/missing.png'"):
        run(model_dir, jsonl, tmp_path / "missing")


def test_arguments_are_checked():
    with pytest.raises(SystemExit, match="temperature"):
        evaluate.main(["--model", "m", "--data", "d", "--output_dir", "o", "--n", "4"])
    with pytest.raises(SystemExit, match="no --model"):
        evaluate.main(["--regrade", "f", "--model", "m", "--output_dir", "o"])
    with pytest.raises(SystemExit, match="--batch_size"):
        evaluate.main(["--model", "m", "--data", "d", "--output_dir", "o", "--batch_size", "0"])


def test_compare_builds_one_table_summary_and_curves(tmp_path):
    """--compare: hand-written results of two models (lmms-eval's layout, fractions 0-1) give the
    summary, the table and the picture."""
    for name, (a, b) in {"base": (0.1, 0.3), "grpo": (0.5, 0.7)}.items():
        (tmp_path / name).mkdir()
        average = {"alias": "average", "accuracy,none": (a + b) / 2, "accuracy_stderr,none": None, "samples": 6}
        results = {"results": {"average": average,
                               "X": {"alias": " - X", "accuracy,none": a, "consistency,none": 1.0, "samples": 4},
                               "Y": {"alias": " - Y", "accuracy,none": b, "consistency,none": None, "samples": 2}},
                   "groups": {"average": average}}
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n"
                                                    for s in (1, 2, 3)))
    summary = evaluate.main(["--output_dir", str(tmp_path / "all"), "--compare", f"base={tmp_path / 'base'}",
                             f"grpo={tmp_path / 'grpo'}", "--paper", "Paper model=0.5319",
                             "--curves", f"SFT loss={tmp_path / 'metrics.jsonl'}:loss"])
    assert summary == json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["grpo"]["average"] == pytest.approx(0.6) and summary["base"]["benchmarks"]["Y"]["accuracy"] == 0.3
    table = (tmp_path / "all" / "summary.md").read_text().splitlines()
    assert table[:3] == ["Accuracy (0-1):", "", "| model | X | Y | Avg |"]
    assert "| base | 0.1000 | 0.3000 | 0.2000 |" in table
    assert "| grpo | 0.5000 | 0.7000 | 0.6000 |" in table
    assert "| Paper model (paper) | - | - | 0.5319 |" in table
    assert "| grpo | 1.0000 | - | 1.0000 |" in table  # consistency: the known benchmarks' mean
    assert (tmp_path / "all" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One unit: a paper average in percent is refused, naming the flag and the fraction to give.
    with pytest.raises(SystemExit, match=r"--paper P=53.19: give the paper's Avg as a fraction 0-1.*0.5319"):
        evaluate.main(["--output_dir", str(tmp_path / "x"), "--compare", f"m={tmp_path / 'base'}",
                       "--paper", "P=53.19"])
    # A results.json of the older layout (percent, `benchmarks`) is named, not misread as fractions.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"benchmarks": {"X": {"accuracy": 50.0}},
                                                               "average": 50.0, "results": {}}))
    with pytest.raises(SystemExit, match="old.results.json: written by an older evaluate.py .*--regrade"):
        evaluate.main(["--output_dir", str(tmp_path / "x"), "--compare", f"m={tmp_path / 'old'}"])
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main(["--output_dir", str(tmp_path / "x"), "--compare", f"m={tmp_path / 'nothing'}"])


# lmms-eval's layout (EvolvingLMMs-Lab/lmms-eval 0.7.3), read from its writer:
# - lmms_eval/evaluator.py, evaluate(): results_dict's keys; simple_evaluate(): config, git_hash,
#   git_branch, lmms_eval_version, date, usage (throughput and efficiency only for API models);
# - lmms_eval/loggers/evaluation_tracker.py, save_results_aggregated(): task_hashes and the fields
#   of GeneralConfigTracker; save_results_samples(): one `{date_id}_samples_{task}.jsonl` per task.
LMMS_EVAL_KEYS = ["results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                  "n-samples", "config", "git_hash", "git_branch", "lmms_eval_version", "date", "usage",
                  "task_hashes", "model_source", "model_name", "model_name_sanitized", "system_instruction",
                  "system_instruction_sha", "fewshot_as_multiturn", "chat_template", "chat_template_sha",
                  "start_time", "end_time", "total_evaluation_time_seconds"]
LMMS_EVAL_CONFIG_KEYS = ["model", "model_args", "model_backend", "batch_size", "batch_sizes", "device", "use_cache",
                         "limit", "offset", "bootstrap_iters", "process_docs_parallel", "gen_kwargs", "random_seed",
                         "numpy_seed", "torch_seed", "fewshot_seed", "resolved_cli_args"]


def lmms_eval_sample(sample: dict) -> dict:
    """What save_results_samples writes for one logged sample, step by step as it does it."""
    sample = dict(sample)
    sample["input"] = sample["arguments"][0]
    sanitize = lambda x: [sanitize(i) for i in x] if isinstance(x, list) else str(x)  # noqa: E731
    sample["resps"], sample["filtered_resps"] = sanitize(sample["resps"]), sanitize(sample["filtered_resps"])
    if isinstance(sample["resps"], list) and len(sample["resps"]) == 1:
        sample["resps"] = sample["resps"][0]
    if isinstance(sample["filtered_resps"], list) and len(sample["filtered_resps"]) == 1:
        sample["filtered_resps"] = sample["filtered_resps"][0]
    if sample["resps"] == sample["filtered_resps"]:
        sample.pop("resps")
    sample["target"] = str(sample["target"])
    sample.pop("arguments")
    sample.pop("doc")
    return sample


def test_results_and_samples_files_have_lmms_evals_layout(model_dir, toy_data_dir, tmp_path):
    """results.json and the samples files key for key as lmms-eval's writer lays them out, from a
    greedy run (K = 1) and a regrade of K = 3 samples; our only extra keys are named."""
    greedy = run(model_dir, toy_data_dir, tmp_path / "greedy")
    source = tmp_path / "hand.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in HAND_LINES))
    sampled = evaluate.main(["--regrade", str(source), "--output_dir", str(tmp_path / "sampled")])
    for results, folder, k in ((greedy, tmp_path / "greedy", 1), (sampled, tmp_path / "sampled", 3)):
        assert json.loads((folder / "results.json").read_text()) == results
        assert list(results) == LMMS_EVAL_KEYS + ["transformers_version", "torch_version", "skipped"]
        assert list(results["config"]) == LMMS_EVAL_CONFIG_KEYS
        names = results["group_subtasks"]["average"]
        assert list(results["results"]) == ["average", *names] and list(results["groups"]) == ["average"]
        metrics = ["accuracy", *([f"maj@{k}", f"pass@{k}"] if k > 1 else [])]
        for name in names:
            assert list(results["results"][name]) == ["alias", *[f"{m}{s},none" for m in metrics for s in ("", "_stderr")],
                                                      "format_rate,none", "consistency,none", "samples"]
            assert results["higher_is_better"][name] == {m: True for m in [*metrics, "format_rate", "consistency"]}
            assert results["n-shot"][name] == 0 and results["versions"][name] == evaluate.TASK_VERSION
            assert results["configs"][name]["task"] == name and results["configs"][name]["repeats"] == k
        # One samples file per task, `{date_id}_samples_{task}.jsonl`, each line what lmms-eval's
        # writer makes of the logged sample (doc_id, doc, target, arguments, resps, filtered_resps,
        # token_counts, doc_hash, the metrics); task_hashes as save_results_aggregated hashes them.
        lines = read(folder / "predictions.jsonl")
        assert sorted(p.name for p in folder.glob("*_samples_*")) == \
            sorted(f"{results['date']}_samples_{name}.jsonl" for name in names)
        for name in names:
            logged = [{"doc_id": line.get("dataset_index"), "doc": line, "target": line["answer_label"],
                       "arguments": [line.get("prompt")], "resps": [line["responses"]], "filtered_resps": [line["preds"]],
                       "token_counts": [None], "doc_hash": evaluate.doc_hash(line), **evaluate.per_row_metrics(line)}
                      for line in lines if line["dataset_name"] == name]
            assert read(folder / f"{results['date']}_samples_{name}.jsonl") == [lmms_eval_sample(s) for s in logged]
            hashes = "".join(f"sample_{i}" + s["doc_hash"] for i, s in enumerate(logged))
            assert results["task_hashes"][name] == hashlib.sha256(hashes.encode("utf-8")).hexdigest()
        # The per-row metrics average to the task's (every share a fraction 0-1).
        for name in names:
            rows = read(folder / f"{results['date']}_samples_{name}.jsonl")
            assert results["results"][name]["accuracy,none"] == pytest.approx(sum(r["accuracy"] for r in rows) / len(rows))
            assert 0 <= results["results"][name]["accuracy,none"] <= 1
    assert greedy["model_name"] == model_dir and greedy["config"]["resolved_cli_args"]["data"] == toy_data_dir
    assert greedy["chat_template_sha"] == hashlib.sha256(greedy["chat_template"].encode()).hexdigest()
    # The doc hash is the row, not the model's answer to it.
    line = HAND_LINES[0] | {"prompt": "p", "options": {}, "dataset_index": 0}
    assert evaluate.doc_hash(line) == evaluate.doc_hash(line | {"responses": ["other"]})
    assert evaluate.doc_hash(line) != evaluate.doc_hash(line | {"answer_label": "Z"})
