"""synth.py equals the official MedVLSynther code, input by input, on a recorded corpus.

tests/data/synth_official.json.gz holds thousands of varied inputs and what the official code (commit
9df6f3b of UCSC-VLAA/MedVLSynther, synthesis/) made of each; benchmarks/official_synth.py wrote it
from a checkout and says how. Here each input goes through synth.py, with no checkout and no network.

Outputs are compared as canonical JSON text (json.dumps), so key order, 1 vs 1.0 vs true and NaN count.
Where the official code raises, synth.py's documented answer is expected instead: None (mcq_of),
(None, False) (rubric_score), ValueError (draw_subset).
"""

import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest

import synth

FIXTURE = Path(__file__).parent / "data" / "synth_official.json.gz"
SHOWN = 5  # mismatches printed in full


@pytest.fixture(scope="module")
def fixture() -> dict:
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cases(fixture) -> dict:
    return fixture["cases"]


def canon(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def ours(function, *args) -> str:
    """synth's answer as canonical text, or "raises Type: message"."""
    try:
        return canon(function(*args))
    except Exception as e:  # a crash of ours is a mismatch to show, not an error of the test
        return f"raises {type(e).__name__}: {e}"


def check(mismatches: list, total: int, what: str) -> None:
    """Fail with the first mismatches in full (input, official, ours)."""
    shown = "\n\n".join("\n".join(f"  {key}: {value!r}"[:2000] for key, value in m.items())
                        for m in mismatches[:SHOWN])
    assert not mismatches, f"{what}: {len(mismatches)}/{total} differ from the official code; first ones:\n{shown}"


def test_parse_json_is_the_official_parser(cases):
    """parse_json(text) = generate/glm_generate.py parse_model_output(strip_reasoning_answer_tags(text)[0]);
    parse_json(text, strip_tags=False) = parse_model_output(text) (the same function in all six
    generate/ and verify/ files; the fixture records that the six agree on every input)."""
    mismatches = []
    for case in cases["parse_json"]:
        for mode, strip in (("strip", True), ("raw", False)):
            got = ours(synth.parse_json, case["in"], strip)
            if got != case[mode]["out"]:
                mismatches.append({"input": case["in"], "strip_tags": strip, "official": case[mode]["out"],
                                   "ours": got})
    check(mismatches, 2 * len(cases["parse_json"]), "parse_json")


def test_parse_model_output_copies_agree(fixture):
    """The recorded corpus found no input on which the six official parse_model_output copies (and
    the two strip_reasoning_answer_tags copies) differ, so one parse_json stands for all of them."""
    agree, total = fixture["parse_model_output_copies_agree"]
    assert agree == total == len(fixture["cases"]["parse_json"])


def test_mcq_of_is_the_official_normalization(cases):
    """mcq_of = combine_generated_MCQ_parquet.py normalize_generated_vqa; where it raises, or where the
    Arrow struct it then goes through (pa_generated_vqa_array) refuses a value, mcq_of returns None."""
    mismatches = []
    for case in cases["mcq_of"]:
        expected = case.get("out", "null")
        got = ours(synth.mcq_of, json.loads(case["in"]))
        if got != expected:
            mismatches.append({"input": case["in"], "official": case.get("raises", expected), "ours": got})
    check(mismatches, len(cases["mcq_of"]), "mcq_of")


def test_rubric_score_is_the_official_annotation(cases):
    """rubric_score(v) = (verify_score, verify_pass) that anotate_rubric_score.py main()
    (--score_type normalized: extract_rubric, compute_scores, check_required) writes for the record
    {"rubric_verification": v}; (None, False) where that script crashes."""
    mismatches = []
    for case in cases["rubric_score"]:
        expected = case.get("out", canon([None, False]))
        got = ours(lambda v: list(synth.rubric_score(v)), json.loads(case["in"]))
        if got != expected:
            mismatches.append({"input": case["in"], "official": case.get("raises", expected), "ours": got})
    check(mismatches, len(cases["rubric_score"]), "rubric_score")


def records(cases, index: int) -> list:
    """A fresh copy of a recorded record list (synth may keep or change what it is given)."""
    return json.loads(json.dumps(cases["record_lists"][index]))


def test_rebalance_is_the_official_relabeling(cases):
    """rebalance(records) = the lines rebalance_vqa.py main() writes for them (is_valid_gv,
    compute_targets, choose_target_label, build_mapping, remap_options, in its two passes)."""
    mismatches = []
    for case in cases["rebalance"]:
        given = records(cases, case["in"])
        official = [canon(r if gv is None else {**r, "generated_vqa": gv}) for r, gv in zip(given, case["out"])]
        try:
            got = [canon(r) for r in synth.rebalance(records(cases, case["in"]))]
        except Exception as e:  # shown as a mismatch
            got = [f"raises {type(e).__name__}: {e}"]
        if got != official:
            first = next((i for i, (a, b) in enumerate(zip(got, official)) if a != b), min(len(got), len(official)))
            mismatches.append({"list": case["in"], "records": len(given), "lines": (len(official), len(got)),
                               "first differing line": first, "input": given[first] if first < len(given) else None,
                               "official": official[first] if first < len(official) else None,
                               "ours": got[first] if first < len(got) else None})
    check(mismatches, len(cases["rebalance"]), "rebalance")


def test_draw_subset_is_the_official_draw(cases):
    """draw_subset(records, k, seed) = the lines extract_vqa_subset_jsonl.py main() writes with -k k
    --seed seed (is_valid_gv, calculate_target_counts, random.seed then per-letter and global shuffles);
    ValueError where it exits 1 (k beyond the valid MCQs, a letter short, k < 0)."""
    mismatches = []
    for case in cases["draw_subset"]:
        given = records(cases, case["in"])
        official = [canon(given[i]) for i in case["out"]] if "out" in case else "raises ValueError"
        try:
            got = [canon(r) for r in synth.draw_subset(records(cases, case["in"]), case["k"], case["seed"])]
        except ValueError:
            got = "raises ValueError"
        except Exception as e:  # shown as a mismatch
            got = f"raises {type(e).__name__}: {e}"
        if got != official:
            mismatches.append({"list": case["in"], "k": case["k"], "seed": case["seed"],
                               "answers": [(r.get("generated_vqa") or {}).get("answer")
                                           if isinstance(r.get("generated_vqa"), dict) else None for r in given],
                               "official": case.get("raises", official), "ours": got})
    check(mismatches, len(cases["draw_subset"]), "draw_subset")


def digest(text) -> list | None:
    return None if text is None else [len(text), hashlib.sha256(text.encode("utf-8")).hexdigest()]


@pytest.mark.parametrize("family", ["glm", "qwen", "internvl", "glm_pmc"])
def test_generator_prompt_is_the_official_prompt(cases, family):
    """generator_prompt(row, family) = build_prompt_from_row(row) of generate/glm_generate.py,
    qwen_generate.py, internvl_generate.py or glm_generate_pmc.py (their templates, join_captions,
    join_contexts), compared by length and sha256."""
    mismatches = []
    for case in cases["prompts"]:
        expected = case["generator_" + family]
        try:
            got = digest(synth.generator_prompt(json.loads(json.dumps(case["row"])), family))
        except Exception as e:  # shown as a mismatch
            got = f"raises {type(e).__name__}: {e}"
        if got != expected:
            mismatches.append({"row": case["row"], "official [length, sha256]": expected, "ours": got})
    check(mismatches, len(cases["prompts"]), f"generator_prompt {family}")


@pytest.mark.parametrize("family", ["qwen", "glm"])
def test_verifier_prompt_is_the_official_prompt(cases, family):
    """verifier_prompt(row, mcq, family) = build_prompt_from_row(dict(row, generated_vqa=mcq)) of
    verify/qwen_verify.py or verify/glm_verify.py (first caption only; None without an MCQ),
    compared by length and sha256."""
    mismatches = []
    for case in cases["prompts"]:
        expected = case["verifier_" + family]
        try:
            got = digest(synth.verifier_prompt(json.loads(json.dumps(case["row"])), case["mcq"], family))
        except Exception as e:  # shown as a mismatch
            got = f"raises {type(e).__name__}: {e}"
        if got != expected:
            mismatches.append({"row": case["row"], "mcq": case["mcq"], "official [length, sha256]": expected,
                               "ours": got})
    check(mismatches, len(cases["prompts"]), f"verifier_prompt {family}")


def test_the_corpus_is_large_and_varied(fixture, cases):
    """The fixture cannot silently shrink: >= 2,000 inputs per function, the kinds of input the
    comparison is about all present, and both outcomes (value, raise) where the official code has both."""
    assert fixture["official_commit"] == "9df6f3b594303184e9309f27be19be563fe3d570"
    texts = [c["in"] for c in cases["parse_json"]]
    kinds = {
        "fenced ```json": sum("```json" in t for t in texts),
        "bare fence": sum(t.lstrip().startswith("```") and not t.lstrip().startswith("```json") for t in texts),
        "unterminated fence": sum(t.count("```") == 1 for t in texts),
        "<think>..<answer>": sum(bool(re.search(r"(?is)<think>.*</think>\s*<answer>", t)) for t in texts),
        "upper-case tags": sum("<THINK>" in t or "<ANSWER>" in t for t in texts),
        "<answer> alone": sum("<answer>" in t.lower() and "<think>" not in t.lower() for t in texts),
        "smart quotes": sum("“" in t and "”" in t for t in texts),
        "apostrophe ’": sum("’" in t for t in texts),
        "trailing comma": sum(bool(re.search(r",\s*[}\]]", t)) for t in texts),
        "two objects": sum(bool(re.search(r"}\s*\S*\s*{", t)) for t in texts),
        "JSON array": sum(t.lstrip().startswith("[{") for t in texts),
        "empty or blank": sum(not t.strip() for t in texts),
        "non-ASCII": sum(any(ord(ch) > 127 for ch in t) for t in texts),
        "parsed to a dict": sum(c["strip"]["out"].startswith("{") for c in cases["parse_json"]),
        "parsed to None": sum(c["strip"]["out"] == "null" for c in cases["parse_json"]),
        "tags change the result": sum(c["strip"] != c["raw"] for c in cases["parse_json"]),
    }
    assert len(texts) >= 2000 and all(kinds.values()), kinds

    mcq = [json.loads(c["in"]) for c in cases["mcq_of"]]
    options = [m.get("options") for m in mcq if isinstance(m, dict)]
    kinds = {"options a list": sum(isinstance(o, list) for o in options),
             "options a string": sum(isinstance(o, str) for o in options),
             "a non-string option": sum(isinstance(o, dict) and any(not isinstance(v, (str, type(None)))
                                                                   for v in o.values()) for o in options),
             "4 options": sum(isinstance(o, dict) and len(o) == 4 for o in options),
             "answer F or lower-case": sum(isinstance(m, dict) and m.get("answer") in ("F", "a", "e") for m in mcq),
             "not a dict": sum(not isinstance(m, dict) for m in mcq),
             "official raises": sum("raises" in c for c in cases["mcq_of"])}
    assert len(mcq) >= 2000 and all(kinds.values()), kinds

    rubric = [c["in"] for c in cases["rubric_score"]]
    kinds = {"hyphen for the en dash": sum("Image-Text Consistency" in r for r in rubric),
             "lower-case title": sum("stem self-contained" in r for r in rubric),
             "weight as a string": sum('"weight": "' in r for r in rubric),
             "weight a float": sum(bool(re.search(r'"weight": -?\d+\.\d', r)) for r in rubric),
             "weight a bool": sum('"weight": true' in r or '"weight": false' in r for r in rubric),
             "error": sum('"error"' in r for r in rubric), "None": rubric.count("null"),
             "nested": sum(r.startswith('{"result"') for r in rubric),
             "passes": sum(c.get("out", "").endswith("true]") for c in cases["rubric_score"]),
             "official raises": sum("raises" in c for c in cases["rubric_score"])}
    assert len(rubric) >= 2000 and all(kinds.values()), kinds

    lists = cases["record_lists"]
    rebalanced = [len(lists[c["in"]]) for c in cases["rebalance"]]
    drawn = [len(lists[c["in"]]) for c in cases["draw_subset"]]
    assert len(rebalanced) + len(drawn) >= 2000 and sum(rebalanced) >= 2000 and sum(drawn) >= 2000
    assert max(rebalanced) >= 200 and 0 in rebalanced
    outcomes = {"drawn": sum("out" in c and len(c["out"]) > 10 for c in cases["draw_subset"]),
                "k = 0": sum(c["k"] == 0 for c in cases["draw_subset"]),
                "exits 1": sum("raises" in c for c in cases["draw_subset"]),
                "several seeds": len({c["seed"] for c in cases["draw_subset"]}) > 5}
    assert all(outcomes.values()), outcomes

    rows = [c["row"] for c in cases["prompts"]]
    kinds = {"no captions": sum(not r.get("caption") for r in rows),
             "6 captions": sum(len(r.get("caption") or []) == 6 for r in rows),
             "a None caption": sum(None in (r.get("caption") or []) for r in rows),
             "a blank caption": sum(any(c is not None and not c.strip() for c in r.get("caption") or [])
                                    for r in rows),
             "no contexts": sum(r.get("context") is None for r in rows),
             "[[]] contexts": sum(r.get("context") == [[]] for r in rows),
             "no MCQ": sum(c["mcq"] is None for c in cases["prompts"]),
             "empty MCQ": sum(c["mcq"] == {} for c in cases["prompts"])}
    assert len(rows) >= 300 and all(kinds.values()), kinds
