"""Tests of reward.py, the task contract (docs/method.md sections 2-4).

Four rules are checked, each against a table of completions graded by hand from the official source
(UCSC-VLAA/MedVLThinker a3163b1) and against a naive regular-expression statement of it:

    format_ok(s)        re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", s, re.DOTALL)
    reward(s, l, a)     train/my_reward.py: 0 unless format_ok(s); else the FIRST single-line
                        <answer>...</answer> (no DOTALL), or the whole text, stripped, graded
    extract_answer(s)   analysis/regrade_eval_results.py: the LAST <answer>...</answer> (DOTALL),
                        stripped, its first line ("\\n" or "\\r" ends it); else the group of the LAST
                        match of the first of "answer:\\s*(.*)\\s*", "answer is:...", "answer is...",
                        "is:..." (case-insensitive) that matches at all; else the whole stripped
                        text; then the four tags removed, stripped
    pass_correct(s,l,a) eval/run_offline_inference.py: the FIRST <answer>...</answer> (DOTALL) of the
                        stripped text, stripped, else the whole stripped text, graded; no format check
    graded = is_correct(pred, l, a): pred.strip().lower() equals f"{l}. {a}".strip().lower(),
                        l.strip().lower() or a.strip().lower()

The graded answer of evaluation is is_correct(extract_answer(s), l, a).
"""

import io
import json
import os
import random
import re
import time

import pytest
from PIL import Image

from reward import (
    RowError,
    check_row,
    check_rows,
    build_messages,
    build_prompt_text,
    extract_answer,
    format_ok,
    is_correct,
    pass_correct,
    reward,
    sft_target,
    think_text,
)
from runtime import claim_output_dir, load_split, parse_args, write_bad_rows

# --------------------------------------------------------------------------------------------
# Naive reference: the official rules written directly as regular expressions.
# Correct by inspection, but quadratic on adversarial inputs (see test_speed), so reward.py uses
# string scans instead. These are only ever run on short strings here.
# --------------------------------------------------------------------------------------------

NAIVE_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
NAIVE_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>")  # no DOTALL: "." stops at "\n"
NAIVE_ANSWER_DOTALL = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NAIVE_MARKERS = (r"answer:\s*(.*)\s*", r"answer is:\s*(.*)\s*", r"answer is\s*(.*)\s*",
                 r"is:\s*(.*)\s*")
NAIVE_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def naive_is_correct(pred, label, answer):
    # The "letter. text" string is built from the unstripped parts, then stripped as a whole.
    accepted = {f"{label}. {answer}".strip().lower(), label.strip().lower(), answer.strip().lower()}
    return pred.strip().lower() in accepted


def naive_format_ok(s):
    return NAIVE_FORMAT.fullmatch(s) is not None


def naive_reward(s, label, answer):
    if not naive_format_ok(s):
        return 0.0
    match = NAIVE_FIRST_ANSWER.search(s)
    pred = match.group(1).strip() if match else s.strip()
    return 1.0 if naive_is_correct(pred, label, answer) else 0.0


def naive_extract(s):
    blocks = list(NAIVE_ANSWER_DOTALL.finditer(s))
    if blocks:
        text = blocks[-1].group(1).strip()
        line = re.search(r"\s*([^\n\r]+)", text)
        text = line.group(1).strip() if line else text
    else:
        text = s.strip()
        for marker in NAIVE_MARKERS:
            hits = list(re.finditer(marker, s, re.IGNORECASE))
            if hits:
                text = hits[-1].group(1).strip()
                break
    for tag in NAIVE_TAGS:
        text = text.replace(tag, "")
    return text.strip()


def naive_pass_correct(s, label, answer):
    s = s.strip()
    match = NAIVE_ANSWER_DOTALL.search(s)
    return naive_is_correct(match.group(1).strip() if match else s, label, answer)


def naive_think(s):
    match = re.search(r"<think>(.*?)</think>", s, re.DOTALL)
    return match.group(1).strip() if match else None


# --------------------------------------------------------------------------------------------
# The hand table. Unless a row says otherwise the question's answer is B = "Pneumonia".
# Columns: completion, format_ok, training reward, extract_answer, evaluation is_correct.
# --------------------------------------------------------------------------------------------

L, A = "B", "Pneumonia"


def case(id, completion, fmt, rew, extracted, graded, label=L, answer=A):
    return pytest.param(completion, label, answer, fmt, rew, extracted, graded, id=id)


CASES = [
    # --- well formatted, the answer in the forms that are accepted -----------------------------
    case("letter", "<think>x</think><answer>B</answer>", True, 1.0, "B", True),
    case("sft-shape", "<think> reasoning </think>\n<answer> B </answer>", True, 1.0, "B", True),
    case("ws-between", "<think>r</think>\n\n  \t<answer>B</answer>", True, 1.0, "B", True),
    case("letter-dot-text", "<think>r</think><answer>B. Pneumonia</answer>", True, 1.0,
         "B. Pneumonia", True),
    case("option-text", "<think>r</think><answer>Pneumonia</answer>", True, 1.0, "Pneumonia", True),
    case("lower-letter", "<think>r</think><answer>b</answer>", True, 1.0, "b", True),
    case("other-case-text", "<think>r</think><answer>b. PNEUMONIA</answer>", True, 1.0,
         "b. PNEUMONIA", True),
    case("ws-inside-tags", "<think>r</think><answer>\t B \t</answer>", True, 1.0, "B", True),
    case("multiline-think", "<think>\n\nlong\nreasoning\n</think>\n<answer>B</answer>", True, 1.0,
         "B", True),
    case("think-closed-twice", "<think>a</think>b</think><answer>B</answer>", True, 1.0, "B", True),
    # --- well formatted, the answer in forms that are not accepted ------------------------------
    case("wrong-letter", "<think>r</think><answer>C</answer>", True, 0.0, "C", False),
    case("no-space-after-dot", "<think>r</think><answer>B.Pneumonia</answer>", True, 0.0,
         "B.Pneumonia", False),
    case("paren", "<think>r</think><answer>B) Pneumonia</answer>", True, 0.0, "B) Pneumonia",
         False),
    case("letter-dot", "<think>r</think><answer>B.</answer>", True, 0.0, "B.", False),
    case("text-dot", "<think>r</think><answer>pneumonia.</answer>", True, 0.0, "pneumonia.", False),
    # Inside a block the evaluation fallbacks are not used: the block is the prediction.
    case("sentence-in-block", "<think>r</think><answer>The answer is B</answer>", True, 0.0,
         "The answer is B", False),
    # --- format failures: text outside the tags, missing or empty tags --------------------------
    case("text-before", "Sure! <think>r</think><answer>B</answer>", False, 0.0, "B", True),
    case("text-after", "<think>r</think><answer>B</answer> Done.", False, 0.0, "B", True),
    case("trailing-newline", "<think>r</think><answer>B</answer>\n", False, 0.0, "B", True),
    case("leading-space", " <think>r</think><answer>B</answer>", False, 0.0, "B", True),
    case("text-between", "<think>r</think>x<answer>B</answer>", False, 0.0, "B", True),
    case("no-think", "<answer>B</answer>", False, 0.0, "B", True),
    case("no-think-close", "<think>r<answer>B</answer>", False, 0.0, "B", True),
    # No block, no marker ("<answer>" has no ":" after it): whole text, tags removed -> "rB".
    case("no-answer-close", "<think>r</think><answer>B", False, 0.0, "rB", False),
    case("think-only", "<think>r</think>", False, 0.0, "r", False),
    case("empty-string", "", False, 0.0, "", False),
    case("only-whitespace", "   \n ", False, 0.0, "", False),
    # Format holds, but "" equals none of the three accepted strings.
    case("empty-tags", "<think></think><answer></answer>", True, 0.0, "", False),
    case("blank-answer", "<think>r</think><answer>   </answer>", True, 0.0, "", False),
    # --- two answer blocks: training takes the FIRST, evaluation the LAST ----------------------
    case("two-blocks-B-then-C", "<think>r</think><answer>B</answer><answer>C</answer>", True, 1.0,
         "C", False),
    case("two-blocks-C-then-B", "<think>r</think><answer>C</answer><answer>B</answer>", True, 0.0,
         "B", True),
    case("block-inside-think", "<think><answer>B</answer></think><answer>C</answer>", True, 1.0,
         "C", False),
    # --- answers spanning lines: training does not find them (whole text -> 0) -----------------
    case("span-lines", "<think>r</think><answer>\nB\n</answer>", True, 0.0, "B", True),
    case("span-with-explanation", "<think>r</think><answer>B\nbecause of consolidation</answer>",
         True, 0.0, "B", True),
    case("span-first-line-wins", "<think>r</think><answer>\nThe answer:\nB</answer>", True, 0.0,
         "The answer:", False),
    # The first block spans lines, so training sees only the second one, "B".
    case("span-then-one-line", "<think>r</think><answer>\nC\n</answer><answer>B</answer>", True,
         1.0, "B", True),
    # --- "\r" and unicode ------------------------------------------------------------------------
    case("cr-in-answer", "<think>r</think><answer>B\r</answer>", True, 1.0, "B", True),
    # "\r" is not a line break for either rule; "\r\n" is one (of the "\n"), so the block spans.
    case("crlf-in-answer", "<think>r</think><answer>B\r\nPneumonia</answer>", True, 0.0, "B", True),
    # In a block, "\r" ends the first line for evaluation; training's "." crosses it.
    case("cr-splits-block-line", "<think>r</think><answer>B\rPneumonia</answer>", True, 0.0, "B",
         True),
    # U+2028 LINE SEPARATOR is a line break for str.splitlines but not for "." nor for "\n".
    case("u2028-in-answer", "<think>r</think><answer>B\u2028x</answer>", True, 0.0, "B\u2028x",
         False),
    # \s in Python's re is Unicode whitespace: NO-BREAK SPACE and IDEOGRAPHIC SPACE qualify ...
    case("nbsp-ideographic-space", "<think>r</think>\u00a0\u3000<answer>B</answer>", True, 1.0,
         "B", True),
    # ... ZERO WIDTH SPACE does not.
    case("zero-width-space", "<think>r</think>\u200b<answer>B</answer>", False, 0.0, "B", True),
    case("accents-other-case", "<think>r</think><answer>œdème PULMONAIRE</answer>", True, 1.0,
         "œdème PULMONAIRE", True, label="C", answer="Œdème pulmonaire"),
    case("cjk-letter-text", "<think>推理</think><answer>A. 肺炎</answer>", True, 1.0, "A. 肺炎", True,
         label="A", answer="肺炎"),
    case("cjk-text", "<think>推理</think>\n<answer>肺炎</answer>", True, 1.0, "肺炎", True, label="A",
         answer="肺炎"),
    case("fullwidth-letter", "<think>r</think><answer>Ｂ</answer>", True, 0.0, "Ｂ", False),
    # --- leftover tags: training compares them, evaluation strips them --------------------------
    case("double-open", "<think>r</think><answer><answer>B</answer>", True, 0.0, "B", True),
    case("think-close-in-answer", "<think>r</think><answer>B</think></answer>", True, 0.0, "B",
         True),
    # --- evaluation fallbacks (no complete <answer> block) -------------------------------------
    case("the-answer-is", "The answer is B", False, 0.0, "B", True),
    case("answer-colon", "answer: B", False, 0.0, "B", True),
    case("Answer-is-colon", "Answer is: B", False, 0.0, "B", True),
    case("is-colon", "The most likely diagnosis is: B", False, 0.0, "B", True),
    case("IS-colon-upper", "Diagnosis IS: b", False, 0.0, "b", True),
    case("ANSWER-IS-upper", "ANSWER IS B", False, 0.0, "B", True),
    # A marker's match swallows the rest of its line ("(.*)" without DOTALL), so a second
    # "answer:" on the same line is part of the first match's group, not a match of its own.
    case("two-markers-one-line", "answer: A, no wait, answer: B", False, 0.0,
         "A, no wait, answer: B", False),
    case("two-markers-two-lines", "answer: A, no wait\nanswer: B", False, 0.0, "B", True),
    # "\s*" after the marker crosses lines; "(.*)" then takes the next non-blank line.
    case("marker-then-blank-lines", "Final answer:\n\n  B\nbecause", False, 0.0, "B", True),
    # "(.*)" stops at "\n" only: a "\r" stays in the group and is stripped only at its ends.
    case("marker-cr-inside", "answer: B\rmore", False, 0.0, "B\rmore", False),
    # "answer:" is tried first; its (only) occurrence wins over a later "answer is", and the
    # text after it is cut to its first line.
    case("answer-colon-before-answer-is", "Answer: A\nOn reflection the answer is B", False, 0.0,
         "A", False),
    case("answer-colon-beats-later-answer-is", "Final answer: B. Alternative answer is: C", False,
         0.0, "B. Alternative answer is: C", False),
    # "answer is:" is tried before "is:", even though "is:" occurs later.
    case("answer-is-colon-beats-is-colon", "My answer is: B, the other is: C", False, 0.0,
         "B, the other is: C", False),
    # "answer is" (no colon) is tried before "is:", even though "is:" occurs earlier.
    case("answer-is-beats-earlier-is-colon", "It is: A. So the answer is B", False, 0.0, "B", True),
    case("marker-then-open-tag", "<think>r</think> answer: <answer>B", False, 0.0, "B", True),
    case("marker-then-close-tag", "<think>r</think>\nanswer: B</answer>", False, 0.0, "B", True),
    # "answer is" inside the thoughts, an unclosed block after it: " A</think><answer>B" -> "AB".
    case("marker-in-think-unclosed", "<think>I think the answer is A</think><answer>B", False, 0.0,
         "AB", False),
    # No block, no marker: the WHOLE stripped text is the prediction, not its first line.
    case("whole-text-not-first-line", "B\nbecause of consolidation", False, 0.0,
         "B\nbecause of consolidation", False),
    case("whole-text-stripped", "\n\n  B  \n", False, 0.0, "B", True),
    case("whole-text-two-lines", "\n\n  B  \nmore", False, 0.0, "B  \nmore", False),
    # "İ".lower() is two characters: a marker position found in a lowered copy of the text
    # would point 3 characters too far here and lose the "B".
    case("dotted-capital-I-before-marker", "İİİ Answer: B", False, 0.0, "B", True),
    # --- labels and texts with surrounding whitespace: "l. a" is built, then stripped ----------
    # f"{'B '}. {'Pneumonia'}" is "B . Pneumonia": "B. Pneumonia" matches neither it nor "B"/text.
    case("label-trailing-space", "<think>r</think><answer>B. Pneumonia</answer>", True, 0.0,
         "B. Pneumonia", False, label="B ", answer="Pneumonia"),
    case("label-trailing-space-letter", "<think>r</think><answer>B</answer>", True, 1.0, "B", True,
         label="B ", answer="Pneumonia"),
    # f"B. {' Pneumonia'}" has two spaces after the dot; the outer strip keeps them.
    case("answer-leading-space", "<think>r</think><answer>B. Pneumonia</answer>", True, 0.0,
         "B. Pneumonia", False, label="B", answer=" Pneumonia"),
    case("answer-leading-space-two", "<think>r</think><answer>B.  Pneumonia</answer>", True, 1.0,
         "B.  Pneumonia", True, label="B", answer=" Pneumonia"),
    # A leading space of the label is stripped away with the whole string.
    case("label-leading-space", "<think>r</think><answer>B. Pneumonia</answer>", True, 1.0,
         "B. Pneumonia", True, label=" B", answer="Pneumonia"),
]


@pytest.mark.parametrize("completion,label,answer,fmt,rew,extracted,graded", CASES)
def test_hand_table(completion, label, answer, fmt, rew, extracted, graded):
    assert format_ok(completion) is fmt
    assert reward(completion, label, answer) == rew
    assert extract_answer(completion) == extracted
    assert is_correct(extracted, label, answer) is graded


@pytest.mark.parametrize("completion,label,answer,fmt,rew,extracted,graded", CASES)
def test_hand_table_matches_naive_regex(completion, label, answer, fmt, rew, extracted, graded):
    assert naive_format_ok(completion) is fmt
    assert naive_reward(completion, label, answer) == rew
    assert naive_extract(completion) == extracted
    assert naive_is_correct(extracted, label, answer) is graded


def test_table_is_large_enough():
    assert len(CASES) >= 60


# --------------------------------------------------------------------------------------------
# The pass-count grade and the think text (pass counts, trace selection). Answer B = "Pneumonia".
# --------------------------------------------------------------------------------------------

PASS_CASES = [
    # completion, pass_correct, think_text
    ("<think>r</think><answer>B</answer>", True, "r"),
    # No format check: text around the tags, or no think block at all, still counts.
    ("Sure. <answer>B</answer> Done.", True, None),
    ("<answer> b. pneumonia </answer>", True, None),
    # The FIRST block (evaluation takes the last).
    ("<answer>B</answer><answer>C</answer>", True, None),
    ("<answer>C</answer><answer>B</answer>", False, None),
    # DOTALL: a block spanning lines is found, and it is not cut to a line.
    ("<think>\nlong\n</think>\n<answer>\nB\n</answer>", True, "long"),
    ("<answer>B\nbecause</answer>", False, None),
    # No block: the whole stripped text.
    ("  B \n", True, None),
    ("B\nbecause", False, None),
    ("The answer is B", False, None),
    ("<answer>B", False, None),
    # The first opening tag that has a closing tag after it.
    ("<answer><answer>B</answer>", False, None),
    ("<think> a <think> b </think> c </think>", False, "a <think> b"),
    ("</think><think>x</think>", False, "x"),
    ("<think>unclosed", False, None),
]


@pytest.mark.parametrize("completion,passed,think", PASS_CASES)
def test_pass_grade_and_think_text(completion, passed, think):
    assert pass_correct(completion, "B", "Pneumonia") is passed
    assert naive_pass_correct(completion, "B", "Pneumonia") is passed
    assert think_text(completion) == think == naive_think(completion)


# --------------------------------------------------------------------------------------------
# Random strings from a small alphabet of fragments, where the rules interact most.
# --------------------------------------------------------------------------------------------

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "A", "b", " ", "\n", "answer is", ":",
             "x"]
# Extra fragments for a second pass: other cases, "\r", Unicode whitespace and letters that case-
# fold onto ASCII ones ("ſ" matches "s" and "K" (Kelvin) "k" under re.IGNORECASE), "İ".
UNICODE_FRAGMENTS = FRAGMENTS + ["ANSWER", "Is", "\r", "\u00a0", "\u2028", "\x85", "\u200b", "İ",
                                 "B. x", "anſwer:", "is: ", "A.  x"]


@pytest.mark.parametrize("fragments,n_strings,seed", [(FRAGMENTS, 4000, 0),
                                                      (UNICODE_FRAGMENTS, 2000, 1)])
def test_random_strings_match_naive_regex(fragments, n_strings, seed):
    rng = random.Random(seed)
    n_format_ok = n_rewarded = 0

    def fragments_joined(most):
        return "".join(rng.choice(fragments) for _ in range(rng.randint(0, most)))

    for i in range(n_strings):
        # Three shapes in turn: free text; free text in the <think>...</answer> frame; and the
        # full <think>...</think> <answer>...</answer> skeleton, so that the format often holds.
        if i % 3 == 0:
            s = fragments_joined(14)
        elif i % 3 == 1:
            s = "<think>" + fragments_joined(14) + "</answer>"
        else:
            between = rng.choice(["", " ", "\n", " \n\t"])
            thought, answered = fragments_joined(6), fragments_joined(4)
            s = f"<think>{thought}</think>{between}<answer>{answered}</answer>"
        for label, answer in (("A", "x"), ("b", "answer is"), ("A ", "x"), ("A", " x")):
            r = reward(s, label, answer)
            assert r == naive_reward(s, label, answer), repr(s)
            assert pass_correct(s, label, answer) is naive_pass_correct(s, label, answer), repr(s)
            assert is_correct(s, label, answer) is naive_is_correct(s, label, answer), repr(s)
            n_rewarded += r == 1.0
        assert format_ok(s) is naive_format_ok(s), repr(s)
        n_format_ok += format_ok(s)
        assert extract_answer(s) == naive_extract(s), repr(s)
        assert think_text(s) == naive_think(s), repr(s)
    # Not vacuous: both outcomes of both training rules occur often.
    print(f"format_ok {n_format_ok}/{n_strings}, reward 1 in {n_rewarded}/{2 * n_strings}")
    assert n_strings / 10 < n_format_ok < n_strings * 9 / 10
    assert n_rewarded > n_strings / 25


# --------------------------------------------------------------------------------------------
# Speed on 100 kB adversarial completions.
#
# The naive patterns backtrack quadratically. Measured with CPython 3.11 on the development
# machine (each number one call of the naive regex on the 100 kB input):
#   "<think>" + "</think><answer>" * 6250       fullmatch 2.3 s, findall 2.6 s, search 2.8 s
#   "<answer>" * 12500                           findall 5.3 s, search 5.8 s
# For every "</think><answer>" (or "<answer>") the lazy ".*?" scans on to the end of the text
# looking for "</answer>" that is not there. That is why they are not run here; reward.py scans
# with str.find and handles each input below in milliseconds.
# --------------------------------------------------------------------------------------------

N = 100_000
ADVERSARIAL = {
    "think-then-think-answer-repeated": "<think>" + "</think><answer>" * (N // 16),
    "think-answer-repeated": "</think><answer>" * (N // 16),
    "answer-open-repeated": "<answer>" * (N // 8),
    "answer-open-lines": "<answer>\n" * (N // 9),
    "think-then-spaces": "<think>" + " " * N,
    "think-then-spaces-answer-close": "<think>" + " " * N + "</answer>",
    "think-closes-then-long-whitespace": "<think>" + ("</think>" + " " * 992) * 100 + "</answer>",
    "one-think-close-then-whitespace": "<think></think>" + " \n\t" * (N // 3) + "</answer>",
    "answer-pairs-no-final-close": "<think>r</think>" + "<answer>B</answer>" * (N // 17) + "<a",
    "markers-only": "answer is" * (N // 9),
    "marker-colons-one-line": "answer: " * (N // 8),
    "think-open-repeated": "<think>" * (N // 7),
    "dotted-capital-I": "İ" * N + "answer: B",
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_speed(name):
    s = ADVERSARIAL[name]
    start = time.perf_counter()
    format_ok(s)
    reward(s, "B", "Pneumonia")
    extract_answer(s)
    pass_correct(s, "B", "Pneumonia")
    think_text(s)
    assert time.perf_counter() - start < 0.5


# --------------------------------------------------------------------------------------------
# Prompt (docs/method.md section 3).
# --------------------------------------------------------------------------------------------


def make_row(**overrides):
    row = {
        "images": ["<image 1>", "<image 2>"],  # only counted, never looked at
        "question": "Which organ shows the opacity?",
        "options": json.dumps({"A": "Liver", "B": "Lung", "C": "Œsophagus"}),
        "answer_label": "B",
        "answer": "Lung",
        "reasoning": "The opacity lies in the right lower lobe.",
        "dataset_name": "toy-vqa",
        "dataset_index": 4242,
    }
    row.update(overrides)
    return row


# The instruction's "\n" is a backslash and an "n" (a raw string in the official code), written
# "\\n" below; every other line break is a real newline.
EXPECTED_TEXT = (
    "You will solve a problem/request. You should provide your thoughts within <think> </think> "
    "tags before providing the answer.\\nWrite your final answer within <answer> </answer> tags."
    "\n\nQuestion: Which organ shows the opacity?"
    "\n\nOptions:"
    "\n\nA. Liver"
    "\n\nB. Lung"
    "\n\nC. Œsophagus"
)


def test_prompt_text_exact():
    assert build_prompt_text(make_row()) == EXPECTED_TEXT
    assert "\\n" in EXPECTED_TEXT and EXPECTED_TEXT.count("\\n") == 1


def test_options_keep_their_order():
    row = make_row(options=json.dumps({"B": "Lung", "A": "Liver"}))
    assert build_prompt_text(row).endswith("Options:\n\nB. Lung\n\nA. Liver")


def test_messages_images_first_then_text():
    messages = build_messages(make_row())
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": EXPECTED_TEXT},
            ],
        }
    ]


@pytest.mark.parametrize("images", [None, []])
def test_messages_without_images(images):
    assert build_messages(make_row(images=images)) == [
        {"role": "user", "content": [{"type": "text", "text": EXPECTED_TEXT}]}
    ]


@pytest.mark.parametrize(
    "overrides,why",
    [
        ({"options": "{'A': 'Liver', 'B': 'Lung'}"}, "not JSON (single quotes)"),
        ({"options": json.dumps(["Liver", "Lung"])}, "JSON, but a list"),
        ({"answer_label": "D"}, "label not among the letters"),
    ],
)
@pytest.mark.parametrize("build", [build_prompt_text, build_messages])
def test_bad_rows_raise_row_error_naming_the_row(build, overrides, why):
    with pytest.raises(RowError) as err:
        build(make_row(**overrides))
    message = str(err.value)
    assert "dataset_name" in message and "toy-vqa" in message, why
    assert "dataset_index" in message and "4242" in message, why


def test_sft_target_exact_and_rewarded():
    target = sft_target("The opacity lies in the right lower lobe.", "B")
    expected = "<think> The opacity lies in the right lower lobe. </think>\n<answer> B </answer>"
    assert target == expected
    assert format_ok(target)
    assert reward(target, "B", "Lung") == 1.0
    assert extract_answer(target) == "B"


def test_sft_target_strips_reasoning_and_label():
    # convert_trl_format_for_vlm.py strips both before framing them.
    assert sft_target("\n  r1\nr2 \n", " B ") == "<think> r1\nr2 </think>\n<answer> B </answer>"


# --------------------------------------------------------------------------------------------
# The row check (docs/method.md section 10): every fault named, with the row.
# --------------------------------------------------------------------------------------------


def png_bytes(width, height, truncate=False):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 60)).save(buffer, format="JPEG" if truncate else "PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2] if truncate else data


@pytest.mark.parametrize("overrides,expected", [
    ({"question": None}, "question must be a non-empty string"),
    ({"question": "   "}, "question must be a non-empty string"),
    ({"options": "not json"}, "options is not valid JSON"),
    ({"options": json.dumps({})}, "non-empty JSON object"),
    ({"answer_label": "D"}, "answer_label 'D' is not one of the option letters"),
    ({"answer": "Liver"}, "answer 'Liver' is not the text of option B ('Lung')"),
    ({"answer": None}, "answer None is not the text of option B"),
    ({"images": [None]}, "an image is missing"),
    ({"images": [{"bytes": png_bytes(56, 56, truncate=True), "path": None}]}, "cannot be decoded"),
    ({"images": [{"bytes": png_bytes(1, 500), "path": None}]}, "1x500 px: aspect ratio over 200"),
    ({"images": ["no/such/file.png"]}, "image file not found: 'no/such/file.png'"),
])
def test_check_row_names_row_and_fault(overrides, expected):
    with pytest.raises(RowError) as err:
        check_row(make_row(**overrides))
    assert "dataset_name='toy-vqa' dataset_index=4242" in str(err.value)
    assert expected in str(err.value)


def test_check_row_accepts_and_decodes(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes(60, 40))
    # The answer text is compared after stripping both sides; images: bytes dict, PIL, path.
    row = make_row(answer=" Lung ", images=[{"bytes": png_bytes(30, 20), "path": None},
                                            Image.new("L", (5, 7)), "img/a.png"])
    checked = check_row(row, base_dir=str(tmp_path))
    assert [image.size for image in checked["images"]] == [(30, 20), (5, 7), (60, 40)]
    assert all(image.mode == "RGB" for image in checked["images"])
    assert row["images"][2] == "img/a.png"  # the input row is not modified
    assert check_row(make_row(images=[]))["images"] is None


def test_check_rows_error_lists_rows_and_skip_counts(tmp_path):
    import datasets

    rows = [make_row(dataset_index=i, images=None) for i in range(5)]
    rows[1]["answer_label"] = "Z"
    rows[3]["question"] = ""
    rows[4]["dataset_index"] = 0  # a duplicate key
    ds = datasets.Dataset.from_list(rows)
    with pytest.raises(RowError) as err:
        check_rows(ds, "error")
    message = str(err.value)
    assert message.startswith("3 bad row(s) of 5") and "--on_bad_row skip" in message
    assert "dataset_index=1" in message and "dataset_index=3" in message and "occurs twice" in message
    good, bad = check_rows(ds, "skip")
    assert good == [0, 2]
    assert [b["position"] for b in bad] == [1, 3, 4]
    write_bad_rows(bad, str(tmp_path / "out"))
    lines = (tmp_path / "out" / "bad_rows.jsonl").read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[-1] == "" and json.loads(lines[0])["dataset_index"] == 1


def test_check_rows_names_an_undecodable_image_feature():
    import datasets

    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  **{k: datasets.Value("string") for k in
                                     ("question", "options", "answer_label", "answer", "dataset_name")},
                                  "dataset_index": datasets.Value("int64")})
    rows = [make_row(dataset_index=i, images=[{"bytes": png_bytes(56, 56, truncate=i == 1),
                                                "path": None}]) for i in range(2)]
    for row in rows:
        del row["reasoning"]
    ds = datasets.Dataset.from_list(rows, features=features)
    good, bad = check_rows(ds, "skip")
    assert good == [0] and "dataset_index=1: image cannot be decoded" in bad[0]["reason"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "disk"])
def test_load_split_refuses_empty_and_missing_columns(tmp_path, kind):
    import datasets

    def save(rows, name):
        ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(
            {k: [] for k in make_row()})
        path = str(tmp_path / f"{name}.{kind}")
        if kind == "jsonl":
            ds.to_json(path)
        elif kind == "parquet":
            ds.to_parquet(path)
        else:
            ds.save_to_disk(path)
        return path

    with pytest.raises(ValueError, match="empty|holds no rows"):
        load_split(save([], "empty"), "train")
    row = make_row(images=None)
    del row["answer"]
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answer'\]"):
        load_split(save([row], "no-answer"), "train")
    assert len(load_split(save([make_row(images=None)], "ok"), "train")) == 1


def test_claim_output_dir(tmp_path):
    out = str(tmp_path / "run")
    fingerprint = {"stage": "grpo", "settings": {"lr": 1e-6, "steps": (1, 2)}, "data": "abc"}
    claim_output_dir(out, fingerprint, resume=False)  # a new folder: claimed
    with pytest.raises(SystemExit, match="holds this run already. Pass --resume latest"):
        claim_output_dir(out, fingerprint, resume=False)
    claim_output_dir(out, fingerprint, resume=True)  # the same run, resumed (tuples stored as lists)
    other = dict(fingerprint, settings={"lr": 1e-5, "steps": (1, 2)})
    with pytest.raises(SystemExit, match="holds another run \\(settings differ: lr\\)"):
        claim_output_dir(out, other, resume=True)
    with pytest.raises(SystemExit, match="holds another run \\(data differ\\)"):
        claim_output_dir(out, dict(fingerprint, data="xyz"), resume=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a run folder of this project"):
        claim_output_dir(str(foreign), fingerprint, resume=True)
    assert sorted(os.listdir(foreign)) == ["notes.txt"]


def test_check_rows_writes_nothing_next_to_the_data_and_takes_a_stage_rule(tmp_path):
    import datasets

    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  **{k: datasets.Value("string") for k in
                                     ("question", "options", "answer_label", "answer", "dataset_name",
                                      "reasoning")},
                                  "dataset_index": datasets.Value("int64")})
    rows = [make_row(dataset_index=i, images=[{"bytes": png_bytes(56, 56), "path": None}])
            for i in range(3)]
    rows[2]["reasoning"] = " "
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "data"))
    before = sorted(os.listdir(tmp_path / "data"))
    ds = load_split(str(tmp_path / "data"), "train")
    good, bad = check_rows(ds, "skip", extra_check=lambda r: None if r["reasoning"].strip()
                           else "no reasoning trace")
    assert good == [0, 1] and bad[0]["reason"].endswith("dataset_index=2: no reasoning trace")
    assert sorted(os.listdir(tmp_path / "data")) == before


def test_parse_args_config_file_then_flags(tmp_path):
    from dataclasses import dataclass, field

    @dataclass
    class Args:
        data: str = field(metadata={"help": "required on the command line unless a file sets it"})
        learning_rate: float = 1e-6
        num_epochs: int = 5
        gradient_checkpointing: bool = True

    (tmp_path / "c.yaml").write_text("data: some/set\nlearning_rate: 2.0e-6\ngradient_checkpointing: false\n")
    (tmp_path / "c.json").write_text(json.dumps({"data": "other", "num_epochs": 1}))
    (tmp_path / "bad.yaml").write_text("data: x\nlerning_rate: 1\n")
    args = parse_args(Args, argv=[str(tmp_path / "c.yaml")])
    assert (args.data, args.learning_rate, args.num_epochs, args.gradient_checkpointing) == \
        ("some/set", 2e-6, 5, False)
    args = parse_args(Args, argv=[str(tmp_path / "c.yaml"), "--learning_rate", "3e-6", "--data", "cli"])
    assert (args.data, args.learning_rate) == ("cli", 3e-6)  # a flag overrides the file
    assert parse_args(Args, argv=[str(tmp_path / "c.json")]).num_epochs == 1
    assert parse_args(Args, argv=["--data", "d"]).learning_rate == 1e-6  # no file: the defaults
    with pytest.raises(SystemExit, match=r"unknown setting\(s\) 'lerning_rate' \(did you mean learning_rate\?\)"):
        parse_args(Args, argv=[str(tmp_path / "bad.yaml")])


def test_generation_kwargs_explicit():
    from reward import generation_kwargs

    sampled = generation_kwargs(1.0, 1.0, 64, [7, 9])
    assert sampled == dict(max_new_tokens=64, repetition_penalty=1.0, suppress_tokens=[7, 9],
                           do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None)
    greedy = generation_kwargs(0.0, 1.0, 64, [7])
    assert greedy["do_sample"] is False and greedy["num_beams"] == 1 and greedy["repetition_penalty"] == 1.0


def test_importing_reward_loads_no_torch():
    """Curation and regrading import reward.py without torch: reward.py holds the task only, and
    the machinery that needs torch is in runtime.py and engine.py."""
    import subprocess
    import sys

    code = ("import sys, reward; "
            "print(sorted(m for m in ('torch', 'accelerate', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert out.strip() == "[]"
