"""curate.py: every kept row and every drop, worked out by hand on small hand-made inputs.

Each subcommand runs through `curate.main([...])` as on the command line (one test goes through a
subprocess); outputs are read back with `datasets.load_from_disk` and every row must become a
prompt with `reward.build_messages`.
"""

import csv
import io
import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
from PIL import Image

import curate
import reward
from conftest import ROOT, run_env


def load_checked(out, split=None):
    """The saved output, after checking every row against the task contract."""
    data = datasets.load_from_disk(str(out))
    data = data[split] if split else data
    for row in data:
        reward.build_messages(row)
        assert reward.parse_options(row)[row["answer_label"]] == row["answer"]
    return data


def stats_of(out):
    return json.loads((out / curate.STATS_FILE).read_text())


def png(width, height, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# prepare: PMC-VQA's raw CSV
# ---------------------------------------------------------------------------------------------

GOOD = {"Choice A": " A:Focal uptake ", "Choice B": " B:Diffuse uptake ",
        "Choice C": " C:No uptake ", "Choice D": " D:Ring uptake "}


def pmc_row(path, question="What does the scan show?", answer="Diffuse uptake", label="B", **choices):
    return {"Figure_path": path, "Question": question, "Answer": answer, **GOOD, **choices,
            "Answer_label": label}


# (row, expected drop reason or None); the row number is the dataset_index.
PMC_ROWS = [
    (pmc_row("ok.png"), None),
    # quotes, no-break and plain spaces around cells are stripped, as in the official conversion
    (pmc_row("ok.png", question=' "Which uptake?"\xa0', answer=" 'No uptake' ", label=" C "), None),
    (pmc_row("small.png"), None),                                  # 14 x 21 -> 28 x 42
    (pmc_row("big.png"), None),                                    # 2048 x 512 -> 1024 x 256
    (pmc_row("ok.png", **{"Choice C": " C No uptake "}), "bad choice format"),    # no colon
    (pmc_row("ok.png", **{"Choice B": " C:Diffuse uptake "}), "bad choice format"),  # wrong letter
    (pmc_row("ok.png", **{"Choice D": ""}), "bad choice format"),  # empty cell
    (pmc_row("ok.png", label="E"), "answer_label not among A-D"),
    (pmc_row("ok.png", answer="No uptake", label="B"), "answer text differs from the label's option"),
    (pmc_row("absent.png"), "missing image"),
    (pmc_row(""), "missing image"),
    (pmc_row("garbage.jpg"), "undecodable image"),
    (pmc_row("truncated.png"), "undecodable image"),
    (pmc_row("ok.png", question="  "), "empty question"),
    (pmc_row("thin.png"), None),                                   # 20 x 2000 -> 28 x 2800 -> 10 x 1024
    # "NA" is an answer, not a missing value; a colon inside the text stays
    (pmc_row("ok.png", answer="NA", label="A", **{"Choice A": "A:NA", "Choice D": "D: ratio 1:2"}),
     None),
]


@pytest.fixture(scope="module")
def pmc_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("pmc")
    figures = root / "figures"
    figures.mkdir()
    for name, size in {"ok.png": (40, 30), "small.png": (14, 21), "big.png": (2048, 512),
                       "thin.png": (20, 2000)}.items():
        (figures / name).write_bytes(png(*size))
    (figures / "garbage.jpg").write_bytes(b"this is not an image")
    (figures / "truncated.png").write_bytes(png(64, 64, (1, 2, 3))[:60])
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(PMC_ROWS[0][0]))
        writer.writeheader()
        writer.writerows(row for row, _ in PMC_ROWS)
    out = root / "out"
    curate.main(["prepare", "--pmc_csv", str(root / "train.csv"), "--image_dir", str(figures),
                 "--out", str(out)])
    return out, figures


def test_pmc_csv_keeps_exactly_the_good_rows(pmc_out):
    out, figures = pmc_out
    data = load_checked(out)
    kept = [i for i, (_, reason) in enumerate(PMC_ROWS) if reason is None]
    assert data["dataset_index"] == kept == [0, 1, 2, 3, 14, 15]
    assert set(data["dataset_name"]) == {"PMC-VQA"}
    assert data.features == curate.schema_features()
    first, quoted, *_, na = data
    assert first["question"] == "What does the scan show?"
    assert json.loads(first["options"]) == {"A": "Focal uptake", "B": "Diffuse uptake",
                                            "C": "No uptake", "D": "Ring uptake"}
    assert (first["answer_label"], first["answer"], first["reasoning"]) == ("B", "Diffuse uptake", None)
    assert (quoted["question"], quoted["answer_label"], quoted["answer"]) == \
           ("Which uptake?", "C", "No uptake")
    assert json.loads(na["options"])["D"] == "ratio 1:2"
    assert (na["answer_label"], na["answer"]) == ("A", "NA")
    sizes = [row["images"][0].size for row in data]
    assert sizes == [(40, 30), (40, 30), (28, 42), (1024, 256), (10, 1024), (40, 30)]
    # an image within bounds is stored byte for byte; a resized one is re-encoded
    raw = data.cast_column("images", datasets.List(datasets.Image(decode=False)))
    assert raw[0]["images"][0]["bytes"] == (figures / "ok.png").read_bytes()
    assert raw[0]["images"][0]["path"] == "ok.png"


def test_pmc_csv_counts_every_drop_by_reason(pmc_out):
    out, _ = pmc_out
    stats = stats_of(out)
    expected = {}
    for i, (_, reason) in enumerate(PMC_ROWS):
        if reason:
            expected.setdefault(reason, []).append(i)
    assert stats["dropped"] == {reason: len(rows) for reason, rows in expected.items()}
    assert stats["examples"] == expected
    assert (stats["rows_in"], stats["kept"]) == (16, 6)
    # small and thin go up; big and thin come down
    assert stats["images_resized"] == {"short side up": 2, "long side down": 2}


def test_qwen_size_matches_the_official_arithmetic():
    assert curate.qwen_size(40, 30, 28, 1024) == (40, 30, [])
    assert curate.qwen_size(14, 21, 28, 1024) == (28, 42, ["up"])
    assert curate.qwen_size(21, 14, 28, 1024) == (42, 28, ["up"])
    assert curate.qwen_size(512, 2048, 28, 1024) == (256, 1024, ["down"])
    # up to 2870 x 28, then down: 28 * 1024 / 2870 = 9.99, truncated to 9 as int() does there
    assert curate.qwen_size(1025, 10, 28, 1024) == (1024, 9, ["up", "down"])


# ---------------------------------------------------------------------------------------------
# prepare: a set already in the schema, and a MedQA-like set through the column mapping
# ---------------------------------------------------------------------------------------------


def test_schema_set_validated_copy(toy_data_dir, tmp_path):
    toy = datasets.load_from_disk(toy_data_dir)["train"]
    features = toy.features.copy()
    features["images"] = datasets.List(datasets.Image(decode=False))
    rows = toy.select(range(9)).cast(features, keep_in_memory=True).to_list()
    assert rows[2]["images"] and rows[5]["images"] and rows[8]["images"]  # ToyLesion rows
    rows[1]["options"] = "{not json"
    rows[2]["images"] = [{"bytes": b"broken", "path": None}]
    rows[3]["answer_label"] = "Z"
    rows[4]["answer"] = "Something else"
    rows[6]["dataset_index"] = rows[0]["dataset_index"]           # duplicate key
    rows[7] = dict(rows[7], options='["Low", "High"]', answer_label="B", answer="High")  # list -> A, B
    bad = datasets.Dataset.from_list(rows, features=features).cast(toy.features)
    bad.save_to_disk(str(tmp_path / "in"))
    curate.main(["prepare", "--data", str(tmp_path / "in"), "--out", str(tmp_path / "out")])

    data = load_checked(tmp_path / "out")
    assert data["dataset_index"] == [rows[i]["dataset_index"] for i in (0, 5, 7, 8)]
    assert json.loads(data[2]["options"]) == {"A": "Low", "B": "High"}
    for i, kept in ((0, 0), (5, 1), (8, 3)):   # untouched: text, extra columns, image bytes
        assert {k: v for k, v in data[kept].items() if k != "images"} == \
               {k: v for k, v in toy[i].items() if k != "images"}
    raw = data.cast_column("images", datasets.List(datasets.Image(decode=False)))
    assert raw[1]["images"][0]["bytes"] == rows[5]["images"][0]["bytes"]
    assert stats_of(tmp_path / "out")["examples"] == {
        "bad options (not letter -> text)": [1], "undecodable image": [2],
        "answer not among the options": [3], "answer text differs from the label's option": [4],
        "duplicate dataset_name/dataset_index": [6]}


def test_column_mapping_for_a_medqa_like_set(tmp_path):
    four = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"}
    line = lambda question, options, answer, idx, meta: dict(  # noqa: E731
        question=question, options=options, answer=answer, answer_idx=idx, meta_info=meta)
    lines = [line("First-line drug?", four, "Heparin", "B", "step1"),
             line("Five options?", {**four, "E": "Clopidogrel"}, "Clopidogrel", "E", "step2&3"),
             line("Label E, four options?", four, "Aspirin", "E", "step1"),
             line("Mismatch?", four, "Aspirin", "C", "step1")]
    (tmp_path / "medqa.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curate.main(["prepare", "--data", str(tmp_path / "medqa.jsonl"), "--answer_column", "answer_idx",
                 "--dataset_name", "MedQA", "--out", str(tmp_path / "out")])
    data = load_checked(tmp_path / "out")
    assert data["dataset_index"] == [0, 1] and set(data["dataset_name"]) == {"MedQA"}
    assert json.loads(data[0]["options"]) == four            # the struct's missing E is not an option
    assert json.loads(data[1]["options"])["E"] == "Clopidogrel"
    assert data["answer_label"] == ["B", "E"] and data["meta_info"] == ["step1", "step2&3"]
    assert data["images"] == [None, None]
    assert stats_of(tmp_path / "out")["examples"] == {
        "answer not among the options": [2], "answer text differs from the label's option": [3]}

    # options as a list, the answer given as option text only
    lines = [{"q": "Which?", "choices": ["x", "y", "z"], "ans": "y"},
             {"q": "Twins?", "choices": ["x", "x"], "ans": "x"},
             {"q": "Absent?", "choices": ["x", "y"], "ans": "w"},
             {"q": "Padded?", "choices": ["x", " y "], "ans": "y"}]   # compared stripped, kept as is
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curate.main(["prepare", "--data", str(tmp_path / "other.jsonl"), "--question_column", "q",
                 "--options_column", "choices", "--answer_column", "ans", "--dataset_name", "Other",
                 "--out", str(tmp_path / "out2")])
    data = load_checked(tmp_path / "out2")
    assert [(r["question"], r["answer_label"], r["answer"]) for r in data] == [
        ("Which?", "B", "y"), ("Padded?", "B", " y ")]
    assert stats_of(tmp_path / "out2")["dropped"] == {"answer matches several options": 1,
                                                      "answer not among the options": 1}
    with pytest.raises(ValueError, match="no column"):
        curate.main(["prepare", "--data", str(tmp_path / "other.jsonl"), "--dataset_name", "Other",
                     "--out", str(tmp_path / "out3")])


# ---------------------------------------------------------------------------------------------
# filter: pass counts from a fabricated predictions file
# ---------------------------------------------------------------------------------------------

K = 4


def formatted(label, think="thinking"):
    return f"<think> {think} </think>\n<answer> {label} </answer>"


def fabricate(row):
    """(responses, correct, reward pass count) for one toy row; None for rows left unpredicted.

    p = dataset_index % 5 well-formatted right answers; on odd indices one more right letter
    without think tags (evaluate.py's grading counts it, the training reward does not).
    """
    i, label = row["dataset_index"], row["answer_label"]
    if i % 7 == 3:
        return None
    wrong = "A" if label != "A" else "B"
    p = i % 5
    bare = 1 if i % 2 and p < K else 0
    responses = [formatted(label)] * p + [f"<answer> {label} </answer>"] * bare
    responses += [formatted(wrong)] * (K - len(responses))
    return responses, [1] * (p + bare) + [0] * (K - p - bare), p


def write_predictions(path, rows, extra=()):
    with open(path, "w") as f:
        for row in rows:
            made = fabricate(row)
            if made:
                f.write(json.dumps(dict(row, responses=made[0], correct=made[1])) + "\n")
        for line in extra:
            f.write(json.dumps(line) + "\n")


@pytest.fixture(scope="module")
def toy_train(toy_data_dir):
    return datasets.load_from_disk(toy_data_dir)["train"].select_columns(
        ["dataset_name", "dataset_index", "answer_label", "answer"]).to_list()


@pytest.mark.parametrize("pass_from", ["reward", "correct"])
def test_filter_keeps_the_band_in_seed_42_order(toy_data_dir, toy_train, tmp_path, pass_from):
    stranger = {"dataset_name": "ToyFever", "dataset_index": 99999, "responses": [formatted("A")] * K,
                "correct": [1] * K}
    write_predictions(tmp_path / "p.jsonl", toy_train, [stranger])
    curate.main(["filter", "--data", toy_data_dir, "--split", "train", "--predictions",
                 str(tmp_path / "p.jsonl"), "--max_pass", "3", "--pass_from", pass_from,
                 "--out", str(tmp_path / "out")])

    counts = {}   # dataset_index -> pass count, worked out from the fabrication
    for row in toy_train:
        made = fabricate(row)
        if made:
            counts[row["dataset_index"]] = made[2] if pass_from == "reward" else sum(made[1])
    kept = [row["dataset_index"] for row in toy_train if 1 <= counts.get(row["dataset_index"], -1) <= 3]
    order = np.random.default_rng(42).permutation(len(kept))
    data = load_checked(tmp_path / "out")
    assert data["dataset_index"] == [kept[j] for j in order]
    assert data["pass_count"] == [counts[i] for i in data["dataset_index"]]
    assert any(row["images"] for row in data)     # the image rows came through

    stats = stats_of(tmp_path / "out")
    no_prediction = sum(row["dataset_index"] % 7 == 3 for row in toy_train)
    histogram = {str(c): list(counts.values()).count(c) for c in range(K + 1)}
    assert stats["histogram"] == histogram and sum(histogram.values()) == len(toy_train) - no_prediction
    assert stats["dropped"] == {k: v for k, v in {
        "no prediction": no_prediction, "pass_count < 1": histogram["0"],
        "pass_count > 3": histogram["4"]}.items() if v}
    assert stats["kept"] == len(kept) and stats["predictions_without_row"] == 1

    # filtered again by its own pass_count column, without predictions or shuffling
    curate.main(["filter", "--data", str(tmp_path / "out"), "--min_pass", "2", "--no_shuffle",
                 "--out", str(tmp_path / "again")])
    again = load_checked(tmp_path / "again")
    assert again["dataset_index"] == [i for i in data["dataset_index"] if counts[i] >= 2]


@pytest.mark.parametrize("corrupt, message", [
    (lambda lines: lines + [lines[2]], "a second prediction .* first is line 3"),
    (lambda lines: [dict(lines[0], answer_label="Z")] + lines[1:], "differs from the data"),
    (lambda lines: lines[:1] + [dict(lines[1], responses=lines[1]["responses"][:2])] + lines[2:],
     "2 samples in `responses`, line 1 has 4"),
])
def test_filter_rejects_a_bad_predictions_file(toy_data_dir, toy_train, tmp_path, corrupt, message):
    write_predictions(tmp_path / "p.jsonl", toy_train)
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in corrupt(lines)))
    with pytest.raises(ValueError, match=message):
        curate.main(["filter", "--data", toy_data_dir, "--split", "train", "--predictions",
                     str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out")])


def test_filter_defaults_are_the_paper_band():
    args = curate.FilterArgs(data="d", out="o")
    assert (args.min_pass, args.max_pass, args.shuffle, args.seed) == (1, 7, True, 42)
    assert args.pass_from == "reward"


# ---------------------------------------------------------------------------------------------
# traces: the first correct sample's think text
# ---------------------------------------------------------------------------------------------


def test_traces_keep_the_first_correct_think_text(toy_data_dir, toy_train, tmp_path):
    expected = {}    # dataset_index -> reasoning, or the drop reason
    with open(tmp_path / "teacher.jsonl", "w") as f:
        for row in toy_train:
            i, label = row["dataset_index"], row["answer_label"]
            wrong = "A" if label != "A" else "B"
            if i % 7 == 0:
                expected[i] = "no prediction"
                continue
            kind = i % 4
            if kind == 0:    # a wrong sample, then two right ones: the first right one wins
                responses = [formatted(wrong, "bad"), formatted(label, f"first {i}\nstep"),
                             formatted(label, "second")]
                expected[i] = f"first {i}\nstep"
            elif kind == 1:  # right letter but no think tags, then wrong: nothing usable
                responses = [f"<answer> {label} </answer>", formatted(wrong), formatted(wrong)]
                expected[i] = "no correct sample"
            elif kind == 2:  # the answer may also be the option text; the think text is stripped
                responses = [f"<think>\n  spaced {i}  \n</think><answer> {row['answer']} </answer>",
                             formatted(wrong), formatted(label)]
                expected[i] = f"spaced {i}"
            else:
                responses = [f"<think>   </think> <answer> {label} </answer>", formatted(label),
                             formatted(wrong)]
                expected[i] = "empty think text"
            f.write(json.dumps({"dataset_name": row["dataset_name"], "dataset_index": i,
                                "responses": responses}) + "\n")
    curate.main(["traces", "--data", toy_data_dir, "--split", "train", "--predictions",
                 str(tmp_path / "teacher.jsonl"), "--out", str(tmp_path / "out")])

    data = load_checked(tmp_path / "out")
    reasons = {"no prediction", "no correct sample", "empty think text"}
    kept = [(i, text) for i, text in expected.items() if text not in reasons]
    assert list(zip(data["dataset_index"], data["reasoning"])) == kept   # input order kept
    for row in data:   # the SFT target built from a kept trace earns reward 1 and gives it back
        target = reward.sft_target(row["reasoning"], row["answer_label"])
        assert reward.reward(target, row["answer_label"], row["answer"]) == 1.0
        assert curate.think_text(target) == row["reasoning"]
    stats = stats_of(tmp_path / "out")
    assert stats["dropped"] == {r: list(expected.values()).count(r) for r in reasons}
    assert stats["first_correct_sample"] == {"0": sum(i % 4 == 2 for i, _ in kept),
                                             "1": sum(i % 4 == 0 for i, _ in kept), "2": 0}


# ---------------------------------------------------------------------------------------------
# split and mix
# ---------------------------------------------------------------------------------------------


def test_split_holds_out_n_rows_in_the_documented_order(toy_data_dir, toy_train, tmp_path):
    # through a subprocess once: the command line as a recipe writes it
    done = subprocess.run([sys.executable, "curate.py", "split", "--data", toy_data_dir, "--split",
                           "train", "--n", "10", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "validation: 10 rows" in done.stdout
    indices = [row["dataset_index"] for row in toy_train]
    order = np.random.default_rng(42).permutation(len(indices))
    held_out = load_checked(tmp_path / "out", "validation")
    rest = load_checked(tmp_path / "out", "train")
    assert held_out["dataset_index"] == [indices[j] for j in order[:10]]
    assert rest["dataset_index"] == [indices[j] for j in order[10:]]


def test_mix_concatenates_sets_with_one_schema(pmc_out, toy_data_dir, tmp_path):
    out, _ = pmc_out
    curate.main(["mix", "--data", str(out), toy_data_dir, "--split", "train", "validation",
                 "--out", str(tmp_path / "mix")])
    data = load_checked(tmp_path / "mix")
    pmc, toy = datasets.load_from_disk(str(out)), datasets.load_from_disk(toy_data_dir)["validation"]
    assert data["dataset_index"] == list(pmc["dataset_index"]) + list(toy["dataset_index"])
    assert data["dataset_name"] == list(pmc["dataset_name"]) + list(toy["dataset_name"])
    assert data.features == curate.schema_features()   # toy's extra columns are not in every set
    assert stats_of(tmp_path / "mix")["columns_left_out"] == ["gold_label", "teacher_label", "value"]
    with pytest.raises(ValueError, match="is in both"):
        curate.main(["mix", "--data", toy_data_dir, toy_data_dir, "--split", "test",
                     "--out", str(tmp_path / "twice")])
