"""evaluate.py: batched greedy equals a naive loop, grading by hand, resume, two processes, bad rows."""

import json
import subprocess
import sys

import datasets
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

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
    return evaluate.main(["--model", model_dir, "--data", str(data_dir), "--out", str(out),
                          "--max-new-tokens", str(TOKENS), *map(str, extra)])


def without_time(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "seconds"}


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


SAMPLED = ("--n", 2, "--temperature", 1.0, "--batch-size", 4, "--seed", 7)


@pytest.fixture(scope="module")
def sampled_reference(model_dir, toy_data_dir, tmp_path_factory):
    """An uninterrupted single-process sampled run: 24 rows in 6 batches of 4, 2 samples each."""
    out = tmp_path_factory.mktemp("sampled_reference")
    return out, run(model_dir, toy_data_dir, out, *SAMPLED)


# --------------------------------------------------------------------------------------------
# Greedy: batching, left padding and ordering by length change nothing
# --------------------------------------------------------------------------------------------


def test_greedy_equals_one_row_at_a_time_generate(model_dir, toy_data_dir, tmp_path):
    results = run(model_dir, toy_data_dir, tmp_path, "--batch-size", 8)
    lines = read(tmp_path / "predictions.jsonl")

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
        assert line["responses"] == [response]
        assert line["preds"] == [reward.extract_answer(response)]
        graded = reward.is_correct(line["preds"][0], row["answer_label"], row["answer"])
        assert line["correct"] == [int(graded)]
    # Not vacuous: responses differ from row to row.
    assert len({line["responses"][0] for line in lines}) > 20
    assert set(results["benchmarks"]) == {"ToyHeartRate", "ToyFever", "ToyLesion"}
    assert all(b["n"] == 8 for b in results["benchmarks"].values())
    assert json.loads((tmp_path / "results.json").read_text()) == results


# --------------------------------------------------------------------------------------------
# Grading: a hand-written predictions file, worked by hand
# --------------------------------------------------------------------------------------------

OPTIONS = {"A": "Asthma", "B": "Pneumonia", "C": "Bronchitis"}
HAND_LINES = [
    # X, row 1 (label B): B (reasoning names pneumonia -> consistent), A (names asthma -> consistent),
    # "Pneumonia" via the "answer is" fallback (no think text -> null; format fails).
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
    # Y: only the required fields. No options: votes are the stripped lowercased answers, so
    # "b", "a", "b. pneumonia" tie at one vote each and the first seen, "b", wins (correct).
    {"dataset_name": "Y", "answer_label": "B", "answer": "Pneumonia",
     "responses": ["<answer>b</answer>", "answer: A", "<answer>B. Pneumonia</answer>"]},
    # Y: "A", "B", "C" tie; "A" is first seen and wrong. One of three correct: pass, not maj.
    {"dataset_name": "Y", "answer_label": "B", "answer": "Pneumonia", "responses": ["A", "B", "C"]},
]


def test_regrade_gives_hand_computed_metrics(tmp_path, capsys):
    source = tmp_path / "hand.jsonl"
    # As another tool might write it: no newline after the last line.
    source.write_text("\n".join(json.dumps(line) for line in HAND_LINES))
    results = evaluate.main(["--regrade", str(source), "--out", str(tmp_path / "out")])

    lines = read(tmp_path / "out" / "predictions.jsonl")
    assert [line["preds"] for line in lines] == [["B", "A", "Pneumonia"], ["C", "C. Bronchitis", "B"],
                                                 ["b", "A", "B. Pneumonia"], ["A", "B", "C"]]
    assert [line["correct"] for line in lines] == [[1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0]]
    assert [line["consistent"] for line in lines] == [[1, 1, None], [1, 0, 0], [None] * 3, [None] * 3]
    x, y = results["benchmarks"]["X"], results["benchmarks"]["Y"]
    assert x["n"] == 2 and y["n"] == 2
    assert x["accuracy"] == pytest.approx(100 * (2 / 3 + 0) / 2)  # mean over rows of the share correct
    assert x["maj@3"] == 50.0 and x["pass@3"] == 50.0
    assert x["format_rate"] == pytest.approx(100 * 5 / 6)
    assert x["consistency"] == pytest.approx(100 * 3 / 5)  # 1, 1 | 1, 0, 0 (the null left out)
    assert y["accuracy"] == pytest.approx(50.0) and y["maj@3"] == 50.0 and y["pass@3"] == 100.0
    assert y["format_rate"] == 0.0 and y["consistency"] is None
    assert results["average"] == pytest.approx((100 / 3 + 50) / 2)  # unweighted over benchmarks
    assert results["skipped"] == {"count": 0, "rows": []}
    table = capsys.readouterr().out
    assert "| | X | Y | Avg |" in table and "| maj@3 | 50.00 | 50.00 | 50.00 |" in table
    assert "| consistency | 60.00 | - | 60.00 |" in table

    # Regrading its own output changes nothing.
    again = evaluate.main(["--regrade", str(tmp_path / "out" / "predictions.jsonl"),
                           "--out", str(tmp_path / "again")])
    assert without_time(again) | {"regraded_from": None} == without_time(results) | {"regraded_from": None}

    source.write_text(json.dumps({"dataset_name": "X", "answer_label": "A", "answer": "x"}) + "\n")
    with pytest.raises(SystemExit, match="line 1"):
        evaluate.main(["--regrade", str(source), "--out", str(tmp_path / "bad")])


def test_option_named_last_prefers_the_longer_option_on_a_tie():
    options = {"A": "Pneumonia", "B": "Bacterial pneumonia", "C": "Asthma"}
    assert evaluate.option_named_last("not asthma: bacterial pneumonia", options) == "B"
    assert evaluate.option_named_last("bacterial pneumonia? No, viral: pneumonia.", options) == "A"
    assert evaluate.option_named_last("no option here", options) is None
    assert evaluate.think_text("<think>a</think><answer>B</answer>") == "a"
    assert evaluate.think_text("no opening tag</think><answer>B</answer>") == "no opening tag"
    assert evaluate.think_text("<think>never closed") is None


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
    assert resumed["benchmarks"]["ToyFever"]["pass@2"] >= resumed["benchmarks"]["ToyFever"]["maj@2"]

    # Everything done: a rerun generates nothing and gives the same results.
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("nothing left to generate"))
    assert without_time(run(model_dir, toy_data_dir, tmp_path, *SAMPLED)) == without_time(reference)
    # Other settings in the same folder are refused, before any work.
    with pytest.raises(SystemExit, match="seed: 7 before, 8 now"):
        run(model_dir, toy_data_dir, tmp_path, *SAMPLED[:-1], 8)


def test_two_processes_equal_one(model_dir, toy_data_dir, sampled_reference, tmp_path):
    reference_dir, reference = sampled_reference
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "evaluate.py"), "--model", model_dir, "--data", toy_data_dir,
               "--out", str(tmp_path),
               "--max-new-tokens", str(TOKENS), *map(str, SAMPLED)]
    done = subprocess.run(command, env=run_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1:" in done.stdout  # both processes generated
    assert (tmp_path / "predictions.jsonl").read_text() == (reference_dir / "predictions.jsonl").read_text()
    assert without_time(json.loads((tmp_path / "results.json").read_text())) == without_time(reference)


# --------------------------------------------------------------------------------------------
# Bad rows: reported by name, an error by default, counted when skipped
# --------------------------------------------------------------------------------------------


def test_bad_rows_are_named_and_counted(model_dir, toy_data_dir, tmp_path):
    test = datasets.load_from_disk(toy_data_dir)["test"].select(range(9))
    rows = test.to_list()
    rows[0]["options"] = "{A: not json"
    rows[1]["answer_label"] = "D"
    rows[2]["images"] = [None]  # ToyLesion rows are 2, 5, 8
    rows[5]["images"] = [{"bytes": b"not an image", "path": None}]
    rows[8]["images"] = [Image.new("RGB", (300, 1))]  # Qwen2.5-VL's processor refuses it
    bad = {rows[i]["dataset_index"] for i in (0, 1, 2, 5, 8)}
    data = tmp_path / "data"
    datasets.Dataset.from_list(rows, features=test.features).save_to_disk(str(data))

    with pytest.raises(reward.RowError) as error:
        run(model_dir, data, tmp_path / "error")
    message = str(error.value)
    assert message.startswith("5 bad row(s)")
    for i in (0, 1, 2, 5, 8):
        assert f"dataset_name={rows[i]['dataset_name']!r} dataset_index={rows[i]['dataset_index']}" in message
    assert not (tmp_path / "error" / "predictions.jsonl").exists()

    results = run(model_dir, data, tmp_path / "skip", "--on-bad-row", "skip")
    assert results["skipped"]["count"] == 5
    assert {row["dataset_index"] for row in results["skipped"]["rows"]} == bad
    assert sum(b["n"] for b in results["benchmarks"].values()) == 4
    assert len(read(tmp_path / "skip" / "predictions.jsonl")) == 4


def test_arguments_are_checked():
    with pytest.raises(SystemExit, match="temperature"):
        evaluate.main(["--model", "m", "--data", "d", "--out", "o", "--n", "4"])
    with pytest.raises(SystemExit, match="no --model"):
        evaluate.main(["--regrade", "f", "--model", "m", "--out", "o"])


def test_compare_builds_one_table_summary_and_curves(tmp_path):
    """--compare: hand-written results of two models give the summary, the table and the picture."""
    for name, (a, b) in {"base": (10.0, 30.0), "grpo": (50.0, 70.0)}.items():
        (tmp_path / name).mkdir()
        results = {"benchmarks": {"X": {"accuracy": a, "n": 4, "consistency": 100.0},
                                  "Y": {"accuracy": b, "n": 2, "consistency": None}},
                   "average": (a + b) / 2}
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n"
                                                    for s in (1, 2, 3)))
    summary = evaluate.main(["--out", str(tmp_path / "all"), "--compare", f"base={tmp_path / 'base'}",
                             f"grpo={tmp_path / 'grpo'}", "--paper", "Paper model=53.19",
                             "--curves", f"SFT loss={tmp_path / 'metrics.jsonl'}:loss"])
    assert summary == json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["grpo"]["average"] == 60.0 and summary["base"]["benchmarks"]["Y"]["accuracy"] == 30.0
    table = (tmp_path / "all" / "summary.md").read_text().splitlines()
    assert table[0] == "| model | X | Y | Avg |"
    assert "| base | 10.00 | 30.00 | 20.00 |" in table
    assert "| grpo | 50.00 | 70.00 | 60.00 |" in table
    assert "| Paper model (paper) | - | - | 53.19 |" in table
    assert "| grpo | 100.00 | - | 100.00 |" in table  # consistency: the known benchmarks' mean
    assert (tmp_path / "all" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main(["--out", str(tmp_path / "x"), "--compare", f"m={tmp_path / 'nothing'}"])
