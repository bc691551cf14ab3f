"""curate.py: every kept row and every drop, worked out by hand on small hand-made inputs, and the
difficulty filter against the official procedure (assign_pass_count.py + order_easy_to_hard.py)
restated below with datasets' own map / filter / shuffle / sort.

Each subcommand runs through `curate.main([...])` as on the command line (one test goes through a
subprocess); outputs are read back with `datasets.load_from_disk` and every row must become a
prompt with `reward.build_messages`.
"""

import csv
import io
import json
import os
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
from PIL import Image

import curate
import reward
import runtime
from conftest import ROOT, run_env


def load_checked(out, split=None):
    """The saved output, after checking every row against the task contract."""
    data = datasets.load_from_disk(str(out))
    data = data[split] if split else data
    for row in data:
        reward.build_messages(row)
        assert reward.parse_options(row)[row["answer_label"]].strip() == row["answer"].strip()
    return data


def stats_of(out):
    return json.loads((out / curate.STATS_FILE).read_text())


def bad_rows_of(out):
    return [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().split("\n") if line]


def png(width, height, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def listing(folder):
    """Every file under a folder with its size and modification time."""
    return sorted((os.path.relpath(os.path.join(root, name), folder),
                   os.path.getsize(os.path.join(root, name)),
                   os.path.getmtime(os.path.join(root, name)))
                  for root, _, names in os.walk(folder) for name in names)


OPTIONS = {"A": "Bradycardia", "B": "Normal rate", "C": "Tachycardia", "D": "Arrhythmia"}


def text_set(path, n, first_index=1000, name="Synth", edit=None):
    """A saved text-only schema set; dataset_index is not the row number, so a join on row numbers
    would show. `edit(i, row)` may spoil row i."""
    rows = []
    for i in range(n):
        label = "ABCD"[i % 4]
        row = dict(images=None, question=f"Q{i}: a heart rate of {40 + i} bpm?",
                   options=json.dumps(OPTIONS), answer_label=label, answer=OPTIONS[label],
                   reasoning=None, dataset_name=name, dataset_index=first_index + i)
        rows.append(edit(i, row) if edit else row)
    datasets.Dataset.from_list(rows, features=curate.schema_features()).save_to_disk(str(path))
    return rows


# ---------------------------------------------------------------------------------------------
# prepare: PMC-VQA's raw CSV
# ---------------------------------------------------------------------------------------------

GOOD = {"Choice A": " A:Focal uptake ", "Choice B": " B:Diffuse uptake ",
        "Choice C": " C:No uptake ", "Choice D": " D:Ring uptake "}


def pmc_row(path, question="What does the scan show?", answer="Diffuse uptake", label="B", **choices):
    return {"Figure_path": path, "Question": question, "Answer": answer, **GOOD, **choices,
            "Answer_label": label}


# (row, fate): None = kept; "drop: reason" = the official conversion drops it (counted, whatever
# --on_bad_row says); "bad: text" = a bad row whose reason holds text. The row number is the
# dataset_index.
PMC_ROWS = [
    (pmc_row("ok.png"), None),
    # quotes, no-break and plain spaces around cells are stripped, as in the official conversion
    (pmc_row("ok.png", question=' "Which uptake?"\xa0', answer=" 'No uptake' ", label=" C "), None),
    (pmc_row("small.png"), None),                                  # 14 x 21 -> 28 x 42
    (pmc_row("big.png"), None),                                    # 2048 x 512 -> 1024 x 256
    (pmc_row("ok.png", **{"Choice C": " C No uptake "}), "drop: bad choice format"),    # no colon
    (pmc_row("ok.png", **{"Choice B": " C:Diffuse uptake "}), "drop: bad choice format"),  # letter
    (pmc_row("ok.png", **{"Choice D": ""}), "drop: bad choice format"),  # empty cell
    (pmc_row("ok.png", label="E"), "drop: answer_label not among A-D"),
    (pmc_row("ok.png", answer="No uptake", label="B"), "drop: answer text differs from the label's option"),
    (pmc_row("absent.png"), "bad: image file not found: 'absent.png'"),
    (pmc_row(""), "bad: image file not found"),
    (pmc_row("garbage.jpg"), "bad: image cannot be decoded"),
    (pmc_row("truncated.png"), "bad: image cannot be decoded"),
    (pmc_row("ok.png", question="  "), "drop: empty question"),    # kept officially: a deviation
    (pmc_row("thin.png"), None),                                   # 20 x 2000 -> 28 x 2800, not down
    # "NA" is an answer, not a missing value; a colon inside the text stays
    (pmc_row("ok.png", answer="NA", label="A", **{"Choice A": "A:NA", "Choice D": "D: ratio 1:2"}),
     None),
    (pmc_row("narrow.png"), None),                                 # 10 x 500 -> 28 x 1400 (official)
    (pmc_row("sliver.png"), "bad: aspect ratio over 200"),         # 1 x 500 -> 28 x 14000
]
SIZES = {"ok.png": (40, 30), "small.png": (14, 21), "big.png": (2048, 512), "thin.png": (20, 2000),
         "narrow.png": (10, 500), "sliver.png": (1, 500)}


@pytest.fixture(scope="module")
def pmc_out(tmp_path_factory):
    """prepare --pmc_csv: first with the default --on_bad_row error (it stops, naming the bad rows),
    then with skip into the same folder (allowed: the same run; the image pass is reused)."""
    root = tmp_path_factory.mktemp("pmc")
    figures = root / "figures"
    figures.mkdir()
    for name, size in SIZES.items():
        (figures / name).write_bytes(png(*size))
    (figures / "garbage.jpg").write_bytes(b"this is not an image")
    (figures / "truncated.png").write_bytes(png(64, 64, (1, 2, 3))[:60])
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(PMC_ROWS[0][0]))
        writer.writeheader()
        writer.writerows(row for row, _ in PMC_ROWS)
    out = root / "out"
    argv = ["prepare", "--pmc_csv", str(root / "train.csv"), "--image_dir", str(figures),
            "--output_dir", str(out)]
    with pytest.raises(reward.RowError) as refused:
        curate.main(argv)
    before = listing(root / "figures")
    curate.main(argv + ["--on_bad_row", "skip"])
    assert listing(root / "figures") == before   # nothing written next to the inputs
    return out, figures, str(refused.value)


def test_pmc_csv_keeps_exactly_the_good_rows(pmc_out):
    out, figures, _ = pmc_out
    data = load_checked(out)
    kept = [i for i, (_, fate) in enumerate(PMC_ROWS) if fate is None]
    assert data["dataset_index"] == kept == [0, 1, 2, 3, 14, 15, 16]
    assert set(data["dataset_name"]) == {"PMC-VQA"}
    assert data.features == curate.schema_features()
    first, quoted, *_, na, _ = data
    assert first["question"] == "What does the scan show?"
    assert json.loads(first["options"]) == {"A": "Focal uptake", "B": "Diffuse uptake",
                                            "C": "No uptake", "D": "Ring uptake"}
    assert (first["answer_label"], first["answer"], first["reasoning"]) == ("B", "Diffuse uptake", None)
    assert (quoted["question"], quoted["answer_label"], quoted["answer"]) == \
           ("Which uptake?", "C", "No uptake")
    assert json.loads(na["options"])["D"] == "ratio 1:2"
    assert (na["answer_label"], na["answer"]) == ("A", "NA")
    # the official if/elif: up OR down, never both (thin and narrow stay over 1024 px)
    sizes = [row["images"][0].size for row in data]
    assert sizes == [(40, 30), (40, 30), (28, 42), (1024, 256), (28, 2800), (40, 30), (28, 1400)]
    # an image within bounds is stored byte for byte; a resized one is re-encoded
    raw = data.cast_column("images", datasets.List(datasets.Image(decode=False)))
    assert raw[0]["images"][0]["bytes"] == (figures / "ok.png").read_bytes()
    assert raw[0]["images"][0]["path"] == "ok.png"
    assert not (out / curate.IMAGE_CACHE).exists()


def test_pmc_csv_counts_every_drop_and_names_every_bad_row(pmc_out):
    out, _, refused = pmc_out
    drops, bad = {}, {}
    for i, (_, fate) in enumerate(PMC_ROWS):
        if fate and fate.startswith("drop: "):
            drops.setdefault(fate[len("drop: "):], []).append(i)
        elif fate:
            bad[i] = fate[len("bad: "):]
    stats = stats_of(out)
    assert stats["dropped"] == {**{reason: len(rows) for reason, rows in drops.items()},
                                curate.BAD_ROW: len(bad)}
    assert stats["examples"] == {**drops, curate.BAD_ROW: sorted(bad)}
    assert (stats["rows_in"], stats["kept"]) == (18, 7)
    assert stats["images_resized"] == {"short side up": 3, "long side down": 1}  # small thin narrow; big
    listed = bad_rows_of(out)
    assert [b["position"] for b in listed] == [b["dataset_index"] for b in listed] == sorted(bad)
    for b in listed:
        assert b["reason"].startswith(f"row dataset_name='PMC-VQA' dataset_index={b['position']}: ")
        assert bad[b["position"]] in b["reason"]
    # the default run stopped with the same rows named, and left the folder resumable
    assert refused.startswith(f"{len(bad)} bad row(s) of 18")
    assert all(f"dataset_index={i}:" in refused for i in bad)


def test_qwen_size_is_the_official_if_elif():
    assert curate.qwen_size(40, 30, 28, 1024) == (40, 30, None)
    assert curate.qwen_size(14, 21, 28, 1024) == (28, 42, "up")
    assert curate.qwen_size(21, 14, 28, 1024) == (42, 28, "up")
    assert curate.qwen_size(512, 2048, 28, 1024) == (256, 1024, "down")
    assert curate.qwen_size(10, 500, 28, 1024) == (28, 1400, "up")      # not then down to 1024
    assert curate.qwen_size(1, 500, 28, 1024) == (28, 14000, "up")      # aspect ratio 500: bad row
    assert curate.qwen_size(27, 2000, 28, 1024) == (28, 2074, "up")     # 2074.07, truncated by int()
    assert curate.qwen_size(28, 1024, 28, 1024) == (28, 1024, None)     # bounds are inclusive


def test_prepare_refuses_a_folder_it_does_not_own(pmc_out, tmp_path):
    out, figures, _ = pmc_out
    csv_path = out.parent / "train.csv"
    argv = ["prepare", "--pmc_csv", str(csv_path), "--image_dir", str(figures), "--on_bad_row", "skip"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("someone's file")
    with pytest.raises(SystemExit, match="not empty"):
        curate.main(argv + ["--output_dir", str(tmp_path / "full")])
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    with pytest.raises(SystemExit, match="holds another run.*max_side"):
        curate.main(argv + ["--output_dir", str(out), "--max_side", "512"])
    before = listing(out)
    curate.main(argv + ["--output_dir", str(out)])     # the same run: done already, untouched
    assert listing(out) == before


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
    before = listing(tmp_path / "in")
    argv = ["prepare", "--data", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(reward.RowError, match=r"^5 bad row\(s\) of 9"):
        curate.main(argv)
    # refused after the image pass: its cache stays for the rerun with skip (the same run)
    assert sorted(os.listdir(tmp_path / "out")) == [curate.IMAGE_CACHE, runtime.RUN_FILE]
    curate.main(argv + ["--on_bad_row", "skip"])
    assert listing(tmp_path / "in") == before

    data = load_checked(tmp_path / "out")
    assert data["dataset_index"] == [rows[i]["dataset_index"] for i in (0, 5, 7, 8)]
    assert json.loads(data[2]["options"]) == {"A": "Low", "B": "High"}
    for i, kept in ((0, 0), (5, 1), (8, 3)):   # untouched: text, extra columns, image bytes
        assert {k: v for k, v in data[kept].items() if k != "images"} == \
               {k: v for k, v in toy[i].items() if k != "images"}
    raw = data.cast_column("images", datasets.List(datasets.Image(decode=False)))
    assert raw[1]["images"][0]["bytes"] == rows[5]["images"][0]["bytes"]
    reasons = {b["position"]: b["reason"] for b in bad_rows_of(tmp_path / "out")}
    assert sorted(reasons) == [1, 2, 3, 4, 6]
    assert "are not letter -> text" in reasons[1]
    assert "image cannot be decoded" in reasons[2]
    assert "answer 'Z' is not among the options" in reasons[3]
    assert "is not the text of option" in reasons[4]
    assert "occurs twice" in reasons[6]
    assert stats_of(tmp_path / "out")["dropped"] == {curate.BAD_ROW: 5}


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
                 "--dataset_name", "MedQA", "--on_bad_row", "skip", "--output_dir", str(tmp_path / "out")])
    data = load_checked(tmp_path / "out")
    assert data["dataset_index"] == [0, 1] and set(data["dataset_name"]) == {"MedQA"}
    assert json.loads(data[0]["options"]) == four            # the struct's missing E is not an option
    assert json.loads(data[1]["options"])["E"] == "Clopidogrel"
    assert data["answer_label"] == ["B", "E"] and data["meta_info"] == ["step1", "step2&3"]
    assert "answer_idx" not in data.column_names              # consumed by the mapping
    assert data["images"] == [None, None]
    reasons = {b["position"]: b["reason"] for b in bad_rows_of(tmp_path / "out")}
    assert "answer 'E' is not among the options" in reasons[2]
    assert "answer 'Aspirin' is not the text of option C" in reasons[3]

    # options as a list, the answer given as option text only
    lines = [{"q": "Which?", "choices": ["x", "y", "z"], "ans": "y"},
             {"q": "Twins?", "choices": ["x", "x"], "ans": "x"},
             {"q": "Absent?", "choices": ["x", "y"], "ans": "w"},
             {"q": "Padded?", "choices": ["x", " y "], "ans": "y"},   # compared stripped, kept as is
             {"q": " ", "choices": ["x", "y"], "ans": "y"}]           # a blank question: a bad row
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curate.main(["prepare", "--data", str(tmp_path / "other.jsonl"), "--question_column", "q",
                 "--options_column", "choices", "--answer_column", "ans", "--dataset_name", "Other",
                 "--on_bad_row", "skip", "--output_dir", str(tmp_path / "out2")])
    data = load_checked(tmp_path / "out2")
    assert [(r["question"], r["answer_label"], r["answer"]) for r in data] == [
        ("Which?", "B", "y"), ("Padded?", "B", " y ")]
    assert data.column_names == list(curate.schema_features())
    reasons = {b["position"]: b["reason"] for b in bad_rows_of(tmp_path / "out2")}
    assert "matches options ['A', 'B']" in reasons[1] and "is not among the options" in reasons[2]
    assert "question must be a non-empty string" in reasons[4]
    with pytest.raises(ValueError, match="missing column"):   # runtime.load_split names the data
        curate.main(["prepare", "--data", str(tmp_path / "other.jsonl"), "--dataset_name", "Other",
                     "--output_dir", str(tmp_path / "out3")])


# ---------------------------------------------------------------------------------------------
# filter: the official procedure, restated, is the reference
# ---------------------------------------------------------------------------------------------


def official_grade(output_text: str, label: str, answer: str) -> bool:
    """run_offline_inference.py's grade, in our words: the text is stripped; the prediction is the
    first <answer>...</answer> (across lines), else the whole text; it is right when, stripped and
    lowercased, it equals "{label}. {answer}" (stripped), the label or the answer text."""
    output_text = output_text.strip()
    block = re.search(r"<answer>(.*?)</answer>", output_text, re.DOTALL)
    pred = (block.group(1) if block else output_text).strip().lower()
    return pred in (f"{label}. {answer}".strip().lower(), label.strip().lower(), answer.strip().lower())


def official_kept(rows, lines, lo=1, hi=7, seed=42):
    """assign_pass_count.py + order_easy_to_hard.py, in our words, on an in-memory table: each row
    gets the num_correct of the line with its dataset_index (a later line wins), else -1; rows with
    lo <= pass_count <= hi stay; Dataset.shuffle(seed), then Dataset.sort("pass_count",
    reverse=True). Returns the dataset_index list."""
    num_correct = {}
    for line in lines:
        num_correct[line["dataset_index"]] = line["num_correct"]
    table = datasets.Dataset.from_list([{"dataset_index": r["dataset_index"]} for r in rows])
    table = table.map(lambda r: {"pass_count": num_correct.get(r["dataset_index"], -1)})
    table = table.filter(lambda r: lo <= r["pass_count"] <= hi)
    table = table.shuffle(seed=seed).sort("pass_count", reverse=True)
    return table["dataset_index"]


def samples_for(rng, label, answer, k=16):
    """K completions of one row with a random number of right ones, from every grading class:
    right by the inference grade (with or without think, bare letter, "B. text", the option text,
    an answer block over several lines) or wrong (a wrong letter, "The answer is B" without tags, a
    wrong first block before a right one, no answer). Line and paragraph separators U+2028, U+2029
    and NEL U+0085 sit inside some of them."""
    wrong = "A" if label != "A" else "B"
    right = [f"<think> rate\u2028check </think>\n<answer> {label} </answer>", f"<answer>{label}</answer>",
             f"  {label}\n", f"{label}. {answer}", f"<think>x</think><answer>\n{answer}\n</answer>",
             f"<think>\x85</think> <answer>{label.lower()}</answer>\u2029"]
    wrong_ = [f"<think> r </think>\n<answer> {wrong} </answer>", f"The answer is {label}",
              f"<answer>{wrong}</answer><answer>{label}</answer>", "<think>\u2029 no answer</think>", ""]
    n_right = int(rng.integers(0, k + 1))
    chosen = [right[j] for j in rng.integers(0, len(right), n_right)]
    chosen += [wrong_[j] for j in rng.integers(0, len(wrong_), k - n_right)]
    rng.shuffle(chosen)
    return chosen, n_right


def write_pass_file(path, rows, seed=0, official=False, skip=lambda i: i % 11 == 5):
    """A predictions file written as the programs write it (json.dumps(..., ensure_ascii=False)):
    evaluate.py's `responses`, or the official `parsed_outputs` + `num_correct`. Rows with skip(i)
    have no line; one line belongs to no row. Returns the lines as the official code sees them."""
    rng, lines = np.random.default_rng(seed), []
    for i, row in enumerate(rows):
        if skip(i):
            continue
        samples, n_right = samples_for(rng, row["answer_label"], row["answer"])
        num_correct = sum(official_grade(s, row["answer_label"], row["answer"]) for s in samples)
        assert num_correct == n_right      # the palette is what it claims to be
        line = {k: row[k] for k in ("dataset_name", "dataset_index", "answer_label", "answer")}
        if official:
            line.update(parsed_outputs=[{"output_text": s.strip(), "is_correct": official_grade(
                s, row["answer_label"], row["answer"])} for s in samples], num_correct=num_correct)
        else:
            line.update(responses=samples)
        lines.append(dict(line, num_correct=num_correct))
    stranger = dict(lines[0], dataset_index=999999)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines + [stranger]:
            written = line if official else {k: v for k, v in line.items() if k != "num_correct"}
            f.write(json.dumps(written, ensure_ascii=False) + "\n")
    return lines


@pytest.mark.parametrize("official", [False, True], ids=["evaluate.py file", "official file"])
def test_filter_keeps_the_official_rows_in_the_official_order(tmp_path, official):
    rows = text_set(tmp_path / "in", 300)
    lines = write_pass_file(tmp_path / "p.jsonl", rows, official=official)
    text = (tmp_path / "p.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) > len(text.split("\n")) - 1   # splitlines() would tear lines
    before = listing(tmp_path / "in")
    curate.main(["filter", "--data", str(tmp_path / "in"), "--predictions", str(tmp_path / "p.jsonl"),
                 "--output_dir", str(tmp_path / "out")])
    assert listing(tmp_path / "in") == before

    expected = official_kept(rows, lines)
    data = load_checked(tmp_path / "out")
    assert data["dataset_index"] == expected and len(expected) > 80
    counts = {line["dataset_index"]: line["num_correct"] for line in lines}
    assert data["pass_count"] == [counts[i] for i in expected]
    assert data["pass_count"] == sorted(data["pass_count"], reverse=True)
    stats = stats_of(tmp_path / "out")
    no_line = sum(1 for i in range(len(rows)) if i % 11 == 5)
    assert stats["dropped"]["no prediction"] == no_line
    assert stats["predictions_without_row"] == 1 and stats["samples_per_row"] == 16
    histogram = {str(c): list(counts.values()).count(c) for c in range(17)}
    assert stats["histogram"] == histogram

    # the training reward counts differently on the same samples: the default matters
    if not official:
        curate.main(["filter", "--data", str(tmp_path / "in"), "--predictions",
                     str(tmp_path / "p.jsonl"), "--pass_from", "reward", "--output_dir",
                     str(tmp_path / "by_reward")])
        assert datasets.load_from_disk(str(tmp_path / "by_reward"))["dataset_index"] != expected


def test_filter_bad_rows_are_named_or_skipped_keeping_the_official_order(tmp_path, capsys):
    def spoil(i, row):
        if i == 7:
            row["answer_label"] = "E"                 # not among the options
        if i == 20:
            row["answer"] = OPTIONS["A" if row["answer_label"] != "A" else "B"]  # another option's text
        return row
    rows = text_set(tmp_path / "in", 120, edit=spoil)
    lines = write_pass_file(tmp_path / "p.jsonl", rows, seed=1, skip=lambda i: False)
    # The inputs from a settings file (JSON here; YAML alike), the output folder as a flag.
    settings = tmp_path / "filter.json"
    settings.write_text(json.dumps({"data": str(tmp_path / "in"), "predictions": str(tmp_path / "p.jsonl")}))
    argv = ["filter", str(settings), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(reward.RowError) as refused:
        curate.main(argv)
    assert "checking" in capsys.readouterr().err  # the row check shows a progress bar
    assert "dataset_index=1007: answer_label 'E'" in str(refused.value)
    assert "dataset_index=1020: answer" in str(refused.value)
    assert not (tmp_path / "out").exists()
    curate.main(argv + ["--on_bad_row", "skip"])
    assert "reading" in capsys.readouterr().err  # and so does the pass over the predictions file
    data = load_checked(tmp_path / "out")
    assert data["dataset_index"] == [i for i in official_kept(rows, lines) if i not in (1007, 1020)]
    assert [b["dataset_index"] for b in bad_rows_of(tmp_path / "out")] == [1007, 1020]
    assert stats_of(tmp_path / "out")["dropped"][curate.BAD_ROW] == 2


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
    with open(path, "w", encoding="utf-8") as f:
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
def test_filter_other_grades_and_orders_on_image_rows(toy_data_dir, toy_train, tmp_path, pass_from):
    """The non-default options: the training reward or the file's `correct`, shuffle only."""
    stranger = {"dataset_name": "ToyFever", "dataset_index": 99999, "responses": [formatted("A")] * K,
                "correct": [1] * K}
    write_predictions(tmp_path / "p.jsonl", toy_train, [stranger])
    curate.main(["filter", "--data", toy_data_dir, "--split", "train", "--predictions",
                 str(tmp_path / "p.jsonl"), "--max_pass", "3", "--pass_from", pass_from,
                 "--order", "none", "--output_dir", str(tmp_path / "out")])

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
                 "--order", "none", "--output_dir", str(tmp_path / "again")])
    again = load_checked(tmp_path / "again")
    assert again["dataset_index"] == [i for i in data["dataset_index"] if counts[i] >= 2]


@pytest.mark.parametrize("corrupt, message", [
    (lambda lines: lines + [lines[2]], "a second prediction .* first is line 3"),
    (lambda lines: [dict(lines[0], answer_label="Z")] + lines[1:], "differs from the data"),
    (lambda lines: lines[:1] + [dict(lines[1], responses=lines[1]["responses"][:2])] + lines[2:],
     "p.jsonl:2: 2 samples, line 1 has 4"),
    (lambda lines: [dict(lines[0], responses=None)] + lines[1:], "p.jsonl:1: the samples must be"),
])
def test_filter_rejects_a_bad_predictions_file(toy_data_dir, toy_train, tmp_path, corrupt, message):
    write_predictions(tmp_path / "p.jsonl", toy_train)
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().split("\n") if line]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in corrupt(lines)))
    with pytest.raises(ValueError, match=message):
        curate.main(["filter", "--data", toy_data_dir, "--split", "train", "--predictions",
                     str(tmp_path / "p.jsonl"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()   # a failed step leaves no claimed folder behind


def test_filter_refuses_an_empty_band_and_an_empty_result(toy_data_dir, toy_train, tmp_path, capsys):
    """--min_pass above --max_pass, before any work; a band no row falls in, after the histogram is
    printed: one line each, and no folder left (an empty set must not look like a success: GRPO
    would find no row to train on)."""
    write_predictions(tmp_path / "p.jsonl", toy_train)
    flags = ["filter", "--data", toy_data_dir, "--split", "train", "--predictions", str(tmp_path / "p.jsonl"),
             "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="^--min_pass 5 is above --max_pass 2: no pass count would be kept$"):
        curate.main(flags + ["--min_pass", "5", "--max_pass", "2"])
    with pytest.raises(ValueError, match=f"no good row has a pass count in \\[{K + 1}, {K + 1}\\]"):
        curate.main(flags + ["--min_pass", str(K + 1), "--max_pass", str(K + 1)])  # K samples a row
    assert "pass_count histogram" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_filter_defaults_are_the_official_ones():
    args = curate.FilterArgs(data="d", output_dir="o")
    assert (args.min_pass, args.max_pass, args.shuffle, args.seed) == (1, 7, True, 42)
    assert (args.pass_from, args.order, args.on_bad_row) == ("inference", "easy_to_hard", "error")


def test_every_step_refuses_an_empty_set_or_a_missing_column(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    rows = text_set(tmp_path / "in", 4)
    (tmp_path / "no_answer.jsonl").write_text("".join(
        json.dumps({k: v for k, v in row.items() if k != "answer"}) + "\n" for row in rows))
    (tmp_path / "p.jsonl").write_text("")
    steps = (["filter", "--predictions", str(tmp_path / "p.jsonl")],
             ["traces", "--predictions", str(tmp_path / "p.jsonl")], ["split", "--n", "1"])
    for data, message, argvs in (
            ("empty.jsonl", "the file is empty", [*steps, ["prepare"]]),
            ("no_answer.jsonl", r"missing column\(s\) \['answer'\]", steps),
            # prepare maps columns: it needs the question, options and answer columns it is given
            ("no_answer.jsonl", r"missing column\(s\) \['choices'\]", [["prepare", "--options_column",
                                                                       "choices"]])):
        for argv in argvs:
            with pytest.raises(ValueError, match=message):
                curate.main(argv + ["--data", str(tmp_path / data), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="no prediction lines"):
        curate.main(["filter", "--data", str(tmp_path / "in"), "--predictions", str(tmp_path / "p.jsonl"),
                     "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# traces: the first correct sample's think text, as merge_pmc_vqa_cot.py takes it
# ---------------------------------------------------------------------------------------------

# (responses with {L} the label, {T} the answer text, {W} a wrong letter; expected reasoning or
# drop reason). Row i of the set gets case i.
TRACE_CASES = [
    (["<think> bad </think><answer>{W}</answer>", "<think> first\nstep </think>\n<answer> {L} </answer>",
      "<think> second </think><answer>{L}</answer>"], "first\nstep"),
    # the first correct sample has no think block: dropped, the later one is not looked at
    (["<answer> {L} </answer>", "<think> later </think><answer>{L}</answer>", "{W}"],
     "first correct sample has no think block"),
    (["{W}", "{L}", "<think> later </think><answer>{L}</answer>"],          # a bare letter is correct
     "first correct sample has no think block"),
    # correct by the inference grade though the training reward is 0 (answer block over lines)
    (["<think> over lines </think><answer>\n{T}\n</answer>", "{W}", "{W}"], "over lines"),
    # stripped (str.strip: U+0085 and U+2028 are whitespace too); separators inside stay inside
    (["  <think>\n  spaced\u2028out\x85here \x85\n</think><answer> {L}. {T} </answer>  ", "{W}", "{W}"],
     "spaced\u2028out\x85here"),
    (["<think>   </think> <answer> {L} </answer>", "<think> x </think><answer>{L}</answer>", "{W}"], ""),
    (["<think> a </think><answer>{W}</answer>", "The answer is {L}", "{W}"], "no correct sample"),
    (None, "no prediction"),
    # the first <think> block, even when a second one follows
    (["<think> one </think><think> two </think><answer>{L}</answer>", "{W}", "{W}"], "one"),
]
DROPS = {"first correct sample has no think block", "no correct sample", "no prediction"}


def test_traces_take_the_first_correct_samples_think_text(tmp_path):
    rows = text_set(tmp_path / "in", len(TRACE_CASES))
    with open(tmp_path / "teacher.jsonl", "w", encoding="utf-8") as f:
        for row, (responses, _) in zip(rows, TRACE_CASES):
            if responses is None:
                continue
            label, text = row["answer_label"], row["answer"]
            fill = dict(L=label, T=text, W="A" if label != "A" else "B")
            f.write(json.dumps({"dataset_name": row["dataset_name"], "dataset_index": row["dataset_index"],
                                "responses": [r.format(**fill) for r in responses]},
                               ensure_ascii=False) + "\n")
    before = listing(tmp_path / "in")
    curate.main(["traces", "--data", str(tmp_path / "in"), "--predictions",
                 str(tmp_path / "teacher.jsonl"), "--output_dir", str(tmp_path / "out")])
    assert listing(tmp_path / "in") == before
    # traces draws no random number: --seed is accepted (as by every stage) but is no setting of the run.
    assert "seed" not in json.loads((tmp_path / "out" / "run.json").read_text())["settings"]

    data = load_checked(tmp_path / "out")
    kept = [(row["dataset_index"], fate) for row, (_, fate) in zip(rows, TRACE_CASES) if fate not in DROPS]
    assert list(zip(data["dataset_index"], data["reasoning"])) == kept   # input order kept
    stats = stats_of(tmp_path / "out")
    assert stats["dropped"] == {"first correct sample has no think block": 2, "no correct sample": 1,
                                "no prediction": 1}
    assert stats["first_correct_sample"] == {"0": 4, "1": 1, "2": 0}
    assert stats["kept_with_empty_think"] == 1


def test_traces_name_a_bad_row(tmp_path):
    def spoil(i, row):
        return dict(row, answer_label="Q") if i == 1 else row
    rows = text_set(tmp_path / "in", 3, edit=spoil)
    with open(tmp_path / "teacher.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row, responses=[formatted(row["answer_label"])])) + "\n")
    argv = ["traces", "--data", str(tmp_path / "in"), "--predictions", str(tmp_path / "teacher.jsonl"),
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(reward.RowError, match="dataset_index=1001: answer_label 'Q' is not one of"):
        curate.main(argv)
    curate.main(argv + ["--on_bad_row", "skip"])
    assert load_checked(tmp_path / "out")["dataset_index"] == [1000, 1002]
    assert [b["dataset_index"] for b in bad_rows_of(tmp_path / "out")] == [1001]


# ---------------------------------------------------------------------------------------------
# split and mix
# ---------------------------------------------------------------------------------------------


def test_split_holds_out_n_rows_in_the_documented_order(toy_data_dir, toy_train, tmp_path):
    # through a subprocess once: the command line as a recipe writes it
    before = listing(toy_data_dir)
    done = subprocess.run([sys.executable, "curate.py", "split", "--data", toy_data_dir, "--split",
                           "train", "--n", "10", "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "validation: 10 rows" in done.stdout
    assert listing(toy_data_dir) == before
    indices = [row["dataset_index"] for row in toy_train]
    order = np.random.default_rng(42).permutation(len(indices))
    held_out = load_checked(tmp_path / "out", "validation")
    rest = load_checked(tmp_path / "out", "train")
    assert held_out["dataset_index"] == [indices[j] for j in order[:10]]
    assert rest["dataset_index"] == [indices[j] for j in order[10:]]
    # what datasets' own train_test_split gives
    parts = datasets.Dataset.from_dict({"i": indices}).train_test_split(test_size=10, seed=42)
    assert (parts["test"]["i"], parts["train"]["i"]) == (held_out["dataset_index"], rest["dataset_index"])


def test_mix_concatenates_sets_with_one_schema(pmc_out, toy_data_dir, tmp_path):
    out, _, _ = pmc_out
    before = listing(toy_data_dir), listing(out)
    curate.main(["mix", "--data", str(out), toy_data_dir, "--split", "train", "validation",
                 "--output_dir", str(tmp_path / "mix")])
    assert (listing(toy_data_dir), listing(out)) == before
    data = load_checked(tmp_path / "mix")
    pmc, toy = datasets.load_from_disk(str(out)), datasets.load_from_disk(toy_data_dir)["validation"]
    assert data["dataset_index"] == list(pmc["dataset_index"]) + list(toy["dataset_index"])
    assert data["dataset_name"] == list(pmc["dataset_name"]) + list(toy["dataset_name"])
    assert data.features == curate.schema_features()   # toy's extra columns are not in every set
    assert stats_of(tmp_path / "mix")["columns_left_out"] == ["gold_label", "teacher_label", "value"]
    with pytest.raises(ValueError, match="is in both"):
        curate.main(["mix", "--data", toy_data_dir, toy_data_dir, "--split", "test",
                     "--output_dir", str(tmp_path / "twice")])


def test_every_step_refuses_a_folder_of_no_run(tmp_path):
    rows = text_set(tmp_path / "in", 12)
    write_pass_file(tmp_path / "p.jsonl", rows, skip=lambda i: False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not a run")
    data = ["--data", str(tmp_path / "in")]
    for argv in (["filter", *data, "--predictions", str(tmp_path / "p.jsonl")],
                 ["traces", *data, "--predictions", str(tmp_path / "p.jsonl")],
                 ["split", *data, "--n", "2"], ["mix", *data, *data], ["prepare", *data]):
        with pytest.raises(SystemExit, match="is not empty and is not a run folder"):
            curate.main(argv + ["--output_dir", str(tmp_path / "taken")])
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]
