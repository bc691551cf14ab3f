"""The golden fixture of tests/test_synth_official.py: varied inputs and what the official
MedVLSynther code makes of them.

Not a test: it needs a checkout of the official repository, which the project does not ship.

    git clone https://github.com/UCSC-VLAA/MedVLSynther /tmp/off && git -C /tmp/off checkout 9df6f3b
    .venv/bin/python benchmarks/official_synth.py --official /tmp/off --output tests/data/synth_official.json.gz

(`--official` is the repository root, the folder holding synthesis/.) The same seed gives the same
file byte for byte, so a rerun shows in `git diff` only when the official code or the inputs change.

How the official code is run, unchanged:
- generate/*.py and verify/*.py import vllm, click, datasets...; their parsing and prompt functions
  (and the templates and patterns they read) are taken out with `ast` and executed on their own.
- combine_generated_MCQ_parquet.py: normalize_generated_vqa, then pa_generated_vqa_array, the Arrow
  struct the combine step writes through (a value Arrow cannot store as a string crashes it there).
- anotate_rubric_score.py, rebalance_vqa.py and extract_vqa_subset_jsonl.py need only the standard
  library: their main() itself runs on JSONL temp files, with sys.argv set, in this process.

What is stored, case by case: the input; the output as canonical JSON text (json.dumps, so that key
order, 1 vs 1.0 vs true and NaN are all compared), or "raises" with the exception. Prompts are stored as
the length and sha256 of the official text, never the text. The output of rebalance_vqa.py is stored
per record as null (the line is the input record) or the generated_vqa it wrote, and that of
extract_vqa_subset_jsonl.py as the input positions of the lines it wrote; both are checked here to
rebuild the official lines exactly.
"""

import ast
import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import sys
import tempfile
import typing
from dataclasses import dataclass

from transformers import HfArgumentParser

OFFICIAL_COMMIT = "9df6f3b594303184e9309f27be19be563fe3d570"
GENERATORS = {"glm": "generate/glm_generate.py", "qwen": "generate/qwen_generate.py",
              "internvl": "generate/internvl_generate.py", "glm_pmc": "generate/glm_generate_pmc.py"}
VERIFIERS = {"qwen": "verify/qwen_verify.py", "glm": "verify/glm_verify.py"}
LABELS = "ABCDE"


@dataclass
class Args:
    official: str  # the root of a checkout of UCSC-VLAA/MedVLSynther (holds synthesis/)
    output: str = "tests/data/synth_official.json.gz"
    seed: int = 0
    n_parse: int = 3000  # model outputs for parse_json (each in both strip_tags modes)
    n_mcq: int = 1200  # hand-mutated MCQs for mcq_of, on top of the parsed outputs
    n_rubric: int = 2500
    n_lists: int = 700  # record lists: one rebalance case and three draw_subset cases each
    n_rows: int = 500  # prompt rows: every generator and verifier family each


# ---------------------------------------------------------------------------------------------
# Running the official code
# ---------------------------------------------------------------------------------------------


def official_functions(path: str, names: tuple[str, ...], **modules) -> dict:
    """The named top-level functions and constants of an official file, executed in a namespace
    of their own (with re, json, the typing names and `modules`, which those definitions use)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())

    def wanted(node):
        if isinstance(node, ast.FunctionDef):
            return node.name in names
        return isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in names for t in node.targets)

    keep = [node for node in tree.body if wanted(node)]
    namespace = {"re": re, "json": json, **{name: getattr(typing, name) for name in typing.__all__}, **modules}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)
    missing = [name for name in names if name not in namespace]
    assert not missing, (path, missing)
    return namespace


def official_script(path: str):
    """An official stdlib-only script imported as a module, so that its main() can be called."""
    spec = importlib.util.spec_from_file_location("official_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, records: list, extra: list[str]) -> list | str:
    """module.main() on a JSONL file of `records` with `--input in --output out` + extra: the
    output lines, or "raises: ..." when it raised or exited non-zero. Its prints are swallowed."""
    with tempfile.TemporaryDirectory() as folder:
        src, dst = os.path.join(folder, "in.jsonl"), os.path.join(folder, "out.jsonl")
        with open(src, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        argv = sys.argv
        sys.argv = ["official", "--input", src, "--output", dst, *extra]
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module.main()
        except SystemExit as e:
            if e.code not in (None, 0):
                return f"raises: SystemExit({e.code})"
        except Exception as e:  # the official script crashed: that is the outcome recorded
            return f"raises: {type(e).__name__}: {e}"
        finally:
            sys.argv = argv
        with open(dst, encoding="utf-8") as f:
            return f.read().splitlines()


def canon(value) -> str:
    """The canonical text of an output: key order, types and NaN all show."""
    return json.dumps(value, ensure_ascii=False)


def outcome(function, *args) -> dict:
    """{"out": canonical output} or {"raises": "Type: message"}."""
    try:
        return {"out": canon(function(*args))}
    except Exception as e:  # a crash of the official function is what is recorded
        return {"raises": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------
# Inputs: model outputs (parse_json) and MCQs (mcq_of)
# ---------------------------------------------------------------------------------------------

WORDS = ["pneumothorax", "left lower lobe", "T2-weighted MRI", "hyperintense", "axial CT", "fracture",
         "nodule", "Which finding", "most likely", "45-year-old", "β-amyloid", "肺结节", "Ünïcödé",
         "embolie pulmonaire", "x²", "≥ 3 cm", "—", "“quoted”", "it’s", "{braces}", "a}b", "c{d",
         "[1, 2]", "back\\slash", 'say "hi"', "tab\there", "new\nline", "😀", "0.5 mm", ",", "}", "{",
         ",}", ", ]", "H&E stain", "‘single’", "«guillemets»", "", " ", "\u00a0nbsp", "ß", "İ",
         "<answer>", "</think>", "```", "json", "NaN", "null", "\\u00e9", "'", "\"", "%s", "{0}"]
PROSE = ["Here is the MCQ:", "Sure! Below is the JSON.", "Output:", "Note: braces {like this} matter.",
         "I hope this helps.", "The answer is C.", "json", "Thinking... {draft: 1}", "```", "]", "}",
         "Final:", "<answer>", "答案如下：", "—", "", "\n", "Explanation: option A {x} is wrong, B is [y]."]
FENCES_OPEN = ["```json\n", "```json", "```json ", "```json  \n", "```JSON\n", "```\n", "```", "``` json\n",
               "```jsonc\n", "```js\n", "```json\n\n", "```jsonnos\n", "```json\r\n", " ```json\n", "\n```json\n"]
FENCES_CLOSE = ["\n```", "```", "", "\n```\nMore text after the fence.", "\n```\n```", "\n``` {x} ```", "\n`` "]
THINK_OPEN = ["<think>", "<THINK>", "<Think>", "<think >", "<think>\n"]
THINK_CLOSE = ["</think>", "</THINK>", "</Think>", "</think >", "\n</think>"]
ANSWER_OPEN = ["<answer>", "<ANSWER>", "<Answer>", "<answer>\n", "< answer>", "<answer >"]
ANSWER_CLOSE = ["</answer>", "</ANSWER>", "</Answer>", "\n</answer>", "</answer >", ""]


def phrase(rng: random.Random, most: int = 4) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, most)))


def option_value(rng: random.Random):
    """Mostly a string; sometimes what models and mutations put there instead."""
    return rng.choices([phrase(rng, 3), rng.randint(-3, 99), rng.random(), True, False, None, "",
                        ["x", 1], {"text": "y"}, 1e16, -0.0, "half an emoji \ud83d"],
                       weights=[40, 3, 2, 1, 1, 2, 2, 1, 1, 1, 1, 1])[0]


def mcq_object(rng: random.Random):
    """A generated MCQ as a model might write it: mostly right, often slightly not."""
    letters = list(LABELS) if rng.random() < 0.75 else rng.choice(
        [list("ABCD"), list("abcde"), list("ABCDEF"), ["A", "B", "C", "D", "E "], ["1", "2", "3", "4", "5"]])
    options = {k: (phrase(rng, 3) if rng.random() < 0.92 else option_value(rng)) for k in letters}
    obj = {"question": phrase(rng, 8), "options": options,
           "answer": rng.choice(list(LABELS)) if rng.random() < 0.85 else rng.choice(
               ["a", "F", " B", "C.", "E) x", 3, None, "", ["A"], "AB"])}
    roll = rng.random()
    if roll < 0.08:
        obj["options"] = [options[k] for k in letters]  # a list of options
    elif roll < 0.12:
        obj["options"] = rng.choice(["A. x B. y", "", None, 0, {}, []])
    elif roll < 0.16:
        obj["options"] = {k: {"text": v} for k, v in options.items()}  # nested
    if rng.random() < 0.15:
        obj["explanation"] = phrase(rng, 6)
    if rng.random() < 0.05:
        obj["difficulty"] = rng.choice(["Easy", "Moderate", 3])
    for key in ("question", "options", "answer"):
        if rng.random() < 0.04:
            del obj[key]
    if rng.random() < 0.05:
        obj["question"] = rng.choice([42, 3.5, None, ["q"], {"text": "q"}, True])
    if rng.random() < 0.05:
        obj = dict(reversed(list(obj.items())))  # keys in another order
    if rng.random() < 0.03:
        obj = {"mcq": obj}  # wrapped
    return obj


def json_text(rng: random.Random) -> str:
    """One JSON-ish body: dumped valid, then sometimes damaged the ways model outputs are."""
    roll = rng.random()
    if roll < 0.04:
        return rng.choice(["{}", "{ }", "null", "[]", "42", '"text"', "{'a': 1}", '{"a": NaN}',
                           '{"a": Infinity, "b": -Infinity}', '{"a": 1e999}', '{"a": 1}{"b": 2}',
                           '{"a": {"b": {"c": [1, {"d": "}"}]}}}', '{"a": "\\ud800"}', "{\"a\": 1,}"])
    obj = mcq_object(rng)
    if rng.random() < 0.05:
        obj = [obj] if rng.random() < 0.5 else [obj, mcq_object(rng)]  # a JSON array
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.3, indent=rng.choice([None, None, 2, 4, "\t"]),
                      separators=rng.choice([None, (",", ":"), (", ", ": ")]))
    return damaged(rng, text)


def damaged(rng: random.Random, text: str) -> str:
    """Smart quotes, trailing commas, apostrophes, Python literals, truncation..."""
    if rng.random() < 0.15:  # every structural quote turned into a smart pair
        parts = text.split('"')
        text = parts[0] + "".join(("“" if i % 2 else "”") + p for i, p in enumerate(parts[1:], 1))
    elif rng.random() < 0.06:  # a few quotes only
        text = "".join(c if c != '"' or rng.random() > 0.1 else rng.choice("“”") for c in text)
    if rng.random() < 0.2:  # trailing commas before some closers, with or without whitespace
        text = re.sub(r"(\s*)([}\]])", lambda m: (rng.choice([",", ", ", ",\n"]) if rng.random() < 0.5 else "")
                      + m.group(1) + m.group(2), text)
    if rng.random() < 0.1:
        text = text.replace("'", "’")
    if rng.random() < 0.05:
        text = text.replace('"', "'")  # single-quoted, Python style
    if rng.random() < 0.04:
        text = text.replace("null", "None").replace("true", "True")
    if rng.random() < 0.04:
        text = text.replace(",", ", // comment\n", 1)
    if rng.random() < 0.06:
        text = text[:rng.randint(0, len(text))]  # cut short
    if rng.random() < 0.03:
        text = text.replace("{", "{{", 1)
    return text


def model_output(rng: random.Random) -> str:
    """A generator's or verifier's raw text: a body, maybe fenced, maybe with prose, maybe tagged."""
    roll = rng.random()
    if roll < 0.03:
        return rng.choice(["", " ", "\n\t ", "no json here", "<think></think><answer></answer>", "😀",
                           "```json\n```", "```", "<answer>", "{", "}", "}{", "{" * 3 + "}" * 2])
    body = json_text(rng)
    if rng.random() < 0.07:  # several objects
        body += rng.choice(["\n", " ", "\n\nAlternative:\n", ""]) + json_text(rng)
    if rng.random() < 0.35:
        body = rng.choice(FENCES_OPEN) + body + rng.choice(FENCES_CLOSE)
    if rng.random() < 0.25:
        body = rng.choice(PROSE) + rng.choice(["\n", " ", ""]) + body
    if rng.random() < 0.2:
        body = body + rng.choice(["\n", " ", ""]) + rng.choice(PROSE)
    if rng.random() < 0.35:
        body = tagged(rng, body)
    if rng.random() < 0.1:
        body = rng.choice([" ", "\n", "\t\n "]) + body + rng.choice([" ", "\n", ""])
    return body


def tagged(rng: random.Random, body: str) -> str:
    """<think>..</think><answer>..</answer> around a body, in the shapes reasoning models use."""
    draft = rng.choice(ANSWER_OPEN) + rng.choice(["{\"question\": \"draft\"}", "B", ""]) + rng.choice(ANSWER_CLOSE)
    think = rng.choice(THINK_OPEN) + rng.choice(PROSE + [phrase(rng, 5), "draft {\"question\": 1}", draft]) \
        + rng.choice(THINK_CLOSE)
    answer = rng.choice(ANSWER_OPEN) + body + rng.choice(ANSWER_CLOSE)
    return rng.choice([
        think + rng.choice(["", "\n", " \n\n "]) + answer,
        answer,
        think + body,
        think + "\nSome words\n" + answer,
        answer + rng.choice(ANSWER_OPEN) + json_text(rng) + "</answer>",
        think + answer + "\nExtra {trailing} text",
        rng.choice(PROSE) + answer,
    ])


def mutated_mcq(rng: random.Random):
    """A parsed generator output, changed by hand: missing or extra keys, odd types and letters."""
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([None, [], ["A"], "text", 3, True, {}])
    obj = mcq_object(rng)
    if not isinstance(obj, dict):
        return obj
    options = obj.get("options")
    if isinstance(options, dict) and rng.random() < 0.5:
        for key in rng.sample(sorted(options), k=min(len(options), rng.randint(1, 2))):
            roll = rng.random()
            if roll < 0.4:
                del options[key]
            else:
                options[key] = option_value(rng)
    if rng.random() < 0.2:
        obj["answer"] = rng.choice(["a", "F", "e", "A ", "B.", 1, 2.0, None, True, ["C"], {"letter": "D"}])
    if rng.random() < 0.1:
        obj["question"] = option_value(rng)
    if rng.random() < 0.05:
        obj["options"] = rng.choice([[], "", None, 0, 1, "A", ["a", "b", "c", "d", "e"], {"a": "x", "b": "y"}])
    return obj


# ---------------------------------------------------------------------------------------------
# Inputs: rubric verifications (rubric_score)
# ---------------------------------------------------------------------------------------------

ESSENTIAL = ["Stem Self-contained", "Vocabulary Constraint", "Diagnosis Leak", "Single Correct Option",
             "Option Type Consistency", "Clinical Validity", "Image–Text Consistency"]
BONUS = [("Plausible Distractors", "Important", 4), ("Parallel Options", "Important", 3),
         ("Stem Concision", "Optional", 2), ("Clarity and Focus", "Optional", 2),
         ("Answer Field Validity", "Important", 3), ("JSON Schema Compliance", "Important", 3)]
PITFALLS = [("Forbidden Terms", -2), ("Synonym Drift", -1), ("Multiple Keys", -2), ("Medical Inaccuracy", -2)]
ODD_NUMBERS = [5.0, 4.7, -2.5, "5", "5.0", " 5 ", "+5", "05", "1_0", "٥", "0x5", "", "five", None, True, False,
               -1, 0, 10**20, [5], {"v": 5}, 2.999, 1e300, -0.0]


def title_variant(rng: random.Random, title: str) -> str:
    """The title as written, or in another case, padded, re-spaced, with a plain hyphen..."""
    return rng.choices([title, title.lower(), title.upper(), f"  {title} ", title.replace(" ", "  "),
                        title.replace("–", "-"), title.replace("–", "—"), title + ".", title.replace("-", " "),
                        title.title(), "\t" + title + "\n"],
                       weights=[60, 6, 3, 6, 3, 6, 2, 2, 2, 2, 2])[0]


def rubric_item(rng: random.Random, idx: int, title: str, category: str, weight: int, full: float,
                odd: float) -> dict:
    """One rubric item: full score with probability `full`, else 0 (as asked); with probability
    `odd` a score, weight or category a model was not asked for."""
    score = (weight if rng.random() < full else 0) if rng.random() >= odd else rng.choice(
        [weight + 1, weight - 1, -weight, 2 * weight, -1, -2, 1, 2] + ODD_NUMBERS)
    if rng.random() < odd:
        weight = rng.choice(ODD_NUMBERS + [3, 4, -5, 1, 2])
    category = category if rng.random() >= odd else rng.choice(
        [category.lower(), category.upper(), f" {category} ", "Bonus", "", None, 3, "Pitfalls",
         "pitfall", "PITFALL", "Essential"])
    item = {"idx": idx, "title": title_variant(rng, title), "description": f"{category} Criteria: ...",
            "category": category, "weight": weight, "score": score, "notes": "ok"}
    for key in ("title", "category", "weight", "score"):
        if rng.random() < 0.03:
            del item[key]
    return item


def rubric(rng: random.Random) -> list:
    """The seven essentials (some dropped or doubled), 0-6 bonus items and 0-4 pitfalls."""
    items = [(t, "Essential", 5) for t in ESSENTIAL if rng.random() > 0.04]
    items += rng.sample(BONUS, k=rng.randint(0, len(BONUS)))
    items += [(t, "Pitfall", rng.choice([w, w, -1, -2, 1, 2, 0])) for t, w in
              rng.sample(PITFALLS, k=rng.randint(0, len(PITFALLS)))]
    if rng.random() < 0.05:
        items.append(rng.choice(items or [(ESSENTIAL[0], "Essential", 5)]))  # a title twice
    if rng.random() < 0.5:
        rng.shuffle(items)
    full, odd = rng.choice([0.5, 0.9, 0.97, 1.0, 1.0]), rng.choice([0.0, 0.0, 0.05, 0.2])
    out = [rubric_item(rng, i, *item, full, odd) for i, item in enumerate(items, 1)]
    if rng.random() < 0.04:
        out.insert(rng.randint(0, len(out)), rng.choice(["item", 5, None, ["Stem Self-contained", 5]]))
    return out


def verification(rng: random.Random):
    """What the verifier stores in rubric_verification: mostly {"rubric": [...]}, else its failures."""
    roll = rng.random()
    if roll < 0.03:
        return None
    if roll < 0.06:
        return {"error": rng.choice(["missing_mcq", "insufficient_evidence", ""])}
    if roll < 0.08:
        return {"error": "insufficient_evidence", "rubric": rubric(rng)}
    if roll < 0.10:
        return {"rubric": rng.choice([[], {}, "Stem Self-contained: 5", None, 5, {"items": rubric(rng)}])}
    if roll < 0.12:
        return {"result": {"rubric": rubric(rng)}}  # nested one level down
    if roll < 0.13:
        return {"Rubric": rubric(rng)}
    if roll < 0.14:
        return {"rubric": [{}]}
    out = {"rubric": rubric(rng)}
    if rng.random() < 0.05:
        out["total"] = rng.randint(0, 40)
    return out


# ---------------------------------------------------------------------------------------------
# Inputs: record lists (rebalance, draw_subset) and prompt rows
# ---------------------------------------------------------------------------------------------


def record(rng: random.Random, i: int, weights: list[float], bad: float) -> dict:
    """One line of the verified JSONL: a valid MCQ whose answer follows `weights`, or (with
    probability `bad`) one of the ways a line is not relabelable."""
    options = {k: rng.choice(["x", "y", "z", "αβ", "肺", "", " ", "1 cm", "{o}"]) + str(rng.randint(0, 9))
               for k in LABELS}
    gv = {"question": rng.choice(["q", "Which?", "Qué?", ""]), "options": options,
          "answer": rng.choices(LABELS, weights=weights)[0]}
    rec = {"dataset_index": i, "generated_vqa": gv} if rng.random() < 0.9 else {"generated_vqa": gv}
    if rng.random() < bad:
        broken(rng, rec, gv, options)
    if rng.random() < 0.03:
        gv["explanation"] = "e"
    if rng.random() < 0.03:
        options["F"] = "f"
    if rng.random() < 0.05:
        rec["verify_score"] = rng.choice([1.0, 0.96])
    return rec


def broken(rng: random.Random, rec: dict, gv: dict, options: dict) -> None:
    """Make one record invalid for relabeling (some of them still drawable: see is_valid_gv)."""
    kind = rng.randrange(13)
    if kind == 0:
        gv["answer"] = rng.choice(["F", "a", "", " A", "AB"])
    elif kind == 1:
        del options[rng.choice(LABELS)]
    elif kind == 2:
        options[rng.choice(LABELS)] = None  # drawable, not relabelable
    elif kind == 3:
        options[rng.choice(LABELS)] = rng.choice([1, 2.5, True, ["x"]])  # drawable, not relabelable
    elif kind == 4:
        gv["question"] = rng.choice([None, 7, ["q"]])
    elif kind == 5:
        rec["generated_vqa"] = None
    elif kind == 6:
        del rec["generated_vqa"]
    elif kind == 7:
        rec["generated_vqa"] = rng.choice([[], "mcq", 3, [gv]])
    elif kind == 8:
        gv["options"] = list(options.values())
    elif kind == 9:
        gv["answer"] = rng.choice([1, None, ["A"]])
    elif kind == 10:
        del gv["question"]
    elif kind == 11:
        gv["options"] = {k.lower(): v for k, v in options.items()}
    else:
        del gv["answer"]


def record_list(rng: random.Random) -> list:
    """0-300 records, answers near-even, skewed or very skewed (a letter may be missing), a share
    of them invalid."""
    size = rng.choices([rng.randint(0, 5), rng.randint(5, 40), rng.randint(40, 100), rng.randint(100, 300)],
                       weights=[20, 40, 30, 10])[0]
    power = rng.choice([0, 1, 2, 4])  # 0: near-even ... 4: a letter may be (almost) missing
    weights = [rng.random() ** power + (0.3 if power < 2 else 0) for _ in LABELS]
    bad = rng.choice([0.0, 0.0, 0.05, 0.2, 0.5, 1.0])
    return [record(rng, i, weights, bad) for i in range(size)]


def subset_size(rng: random.Random, records: list) -> int:
    """k for a draw: mostly what the scarcest answer letter allows (5 x its count), else 0, a few,
    just beyond that, the number of MCQs, beyond it, or negative. (The counts here are rough on
    purpose: the official script decides which records count.)"""
    answers = [r["generated_vqa"].get("answer") for r in records if isinstance(r.get("generated_vqa"), dict)]
    most = 5 * min(answers.count(letter) for letter in LABELS)
    return rng.choice([rng.randint(0, most), rng.randint(0, most), rng.randint(most // 2, most), most,
                       most + rng.randint(1, 4), 0, rng.randint(1, 5), len(answers), len(answers) + 1,
                       rng.randint(-2, -1) if rng.random() < 0.2 else rng.randint(0, len(answers))])


CAPTION_TEXT = ["Axial CT of the chest showing a nodule.", "  leading and trailing  ", "line one\nline two",
                "肺部CT显示结节", "(A) H&E ×40; (B) IHC", "{CONTEXT_BLOCK}", "{CAPTION_BLOCK}", "{MCQ_JSON}",
                'quote " and \\ backslash', "\t", "Fig. 2 — MRI T2", "\u00a0", "\u3000full-width space\u3000",
                "ends with newline\n", "😀 emoji", '"""triple quotes"""']
CONTEXT_TEXT = ["The lesion was biopsied.", "", "   ", "\n", " padded ", "Ünïcödé context", "{CAPTION_BLOCK}",
                "{CONTEXT_BLOCK}", "multi\nline", "\u00a0", "a" * 40]


def prompt_row(rng: random.Random) -> dict:
    """A source row: 0-6 captions (None, empty, blank or text) and contexts in every shape."""
    captions = rng.choice([None, [], None if rng.random() < 0.5 else [], "list", "list", "list", "list"])
    if captions == "list":
        captions = [rng.choice([None, "", " ", rng.choice(CAPTION_TEXT), rng.choice(CAPTION_TEXT),
                                phrase(rng, 5)]) for _ in range(rng.randint(1, 6))]
    contexts = rng.choice([None, [], [[]], [[""]], "list", "list", "list"])
    if contexts == "list":
        contexts = [rng.choice([None, [], [rng.choice(CONTEXT_TEXT) for _ in range(rng.randint(1, 4))],
                                [phrase(rng, 6), phrase(rng, 6)]]) for _ in range(rng.randint(1, 6))]
    row = {"caption": captions, "context": contexts}
    if rng.random() < 0.03:
        del row[rng.choice(["caption", "context"])]
    return row


# ---------------------------------------------------------------------------------------------
# Official outputs
# ---------------------------------------------------------------------------------------------


def generator_names(name: str) -> tuple[str, ...]:
    """What a generator file defines for parsing and prompts (glm_generate_pmc.py has no contexts;
    only the GLM files strip reasoning tags)."""
    names = ("parse_model_output", "join_captions", "build_prompt_from_row", "RUBRIC_PROMPT_TEMPLATE")
    if name != "glm_pmc":
        names += ("join_contexts",)
    if name.startswith("glm"):
        names += ("strip_reasoning_answer_tags", "_ANSWER_PAT", "_ANSWER_ONLY_PAT")
    return names


def load_official(root: str) -> dict:
    """Every official function and script the fixture runs, by a short name."""
    syn = os.path.join(root, "synthesis")
    gen = {name: official_functions(os.path.join(syn, path), generator_names(name))
           for name, path in GENERATORS.items()}
    ver = {name: official_functions(os.path.join(syn, path), (
        "parse_model_output", "join_captions", "join_contexts", "build_prompt_from_row",
        "VERIFICATION_PROMPT_TEMPLATE")) for name, path in VERIFIERS.items()}
    import pyarrow  # the combine step's own dependency, needed only here
    combine = official_functions(os.path.join(syn, "combine_generated_MCQ_parquet.py"),
                                 ("normalize_generated_vqa", "pa_generated_vqa_array"), pa=pyarrow)
    return {"generators": gen, "verifiers": ver, "combine": combine,
            "annotate": official_script(os.path.join(syn, "anotate_rubric_score.py")),
            "rebalance": official_script(os.path.join(syn, "rebalance_vqa.py")),
            "subset": official_script(os.path.join(syn, "extract_vqa_subset_jsonl.py"))}


def parse_cases(off: dict, texts: list[str]) -> tuple[list, int]:
    """parse_json both ways; also how many texts all six parse_model_output copies agree on."""
    glm = off["generators"]["glm"]
    copies = [ns["parse_model_output"] for ns in (*off["generators"].values(), *off["verifiers"].values())]
    strip_copies = [off["generators"][n]["strip_reasoning_answer_tags"] for n in ("glm", "glm_pmc")]
    cases, agree = [], 0
    for text in texts:
        stripped = glm["strip_reasoning_answer_tags"](text)[0]
        raw = [outcome(f, text) for f in copies]
        tags = [outcome(lambda t, s=s: s(t)[0], text) for s in strip_copies]
        agree += all(r == raw[0] for r in raw) and tags[0] == tags[1]
        cases.append({"in": text, "strip": outcome(glm["parse_model_output"], stripped), "raw": raw[0]})
    return cases, agree


def mcq_outcome(combine: dict, parsed) -> dict:
    """normalize_generated_vqa, then the Arrow struct the combine step writes it through."""
    try:
        mcq = combine["normalize_generated_vqa"](parsed)
        combine["pa_generated_vqa_array"]([mcq])
        return {"out": canon(mcq)}
    except Exception as e:  # the official combine step crashes on this one
        return {"raises": f"{type(e).__name__}: {e}"}


def rubric_outcome(annotate, value) -> dict:
    """anotate_rubric_score.py --score_type normalized on the one record {"rubric_verification": value}:
    [verify_score, verify_pass] of the line it writes."""
    lines = run_main(annotate, [{"rubric_verification": value}], ["--score_type", "normalized"])
    if isinstance(lines, str):
        return {"raises": lines[len("raises: "):]}
    (line,) = lines
    rec = json.loads(line)
    return {"out": canon([rec["verify_score"], rec["verify_pass"]])}


def rebalance_outcome(module, records: list) -> dict:
    """rebalance_vqa.py's lines, stored per record as null (unchanged) or the generated_vqa written."""
    lines = run_main(module, records, [])
    if isinstance(lines, str):
        return {"raises": lines[len("raises: "):]}
    assert len(lines) == len(records)
    out = []
    for rec, line in zip(records, lines):
        written = json.loads(line)
        same = line == canon(rec)
        out.append(None if same else written["generated_vqa"])
        rebuilt = rec if same else {**rec, "generated_vqa": written["generated_vqa"]}
        assert canon(rebuilt) == line, (rec, line)  # the encoding gives the official line back
    return {"out": out}


def subset_outcome(module, records: list, k: int, seed: int) -> dict:
    """extract_vqa_subset_jsonl.py -k k --seed seed: the input positions of the lines it wrote."""
    lines = run_main(module, records, ["-k", str(k), "--seed", str(seed)])
    if isinstance(lines, str):
        return {"raises": lines[len("raises: "):]}
    position = {}
    for i, rec in enumerate(records):
        position.setdefault(canon(rec), i)  # identical records make identical lines
    return {"out": [position[line] for line in lines]}


def prompt_digest(text) -> list | None:
    """[length, sha256] of a prompt (None stays None): the fixture holds no official text."""
    if text is None:
        return None
    return [len(text), hashlib.sha256(text.encode("utf-8")).hexdigest()]


def prompt_cases(off: dict, rows: list, mcqs: list) -> list:
    """Each row through every generator and (with its MCQ) every verifier."""
    cases = []
    for row, mcq in zip(rows, mcqs):
        case = {"row": row, "mcq": mcq}
        for name, ns in off["generators"].items():
            case["generator_" + name] = prompt_digest(ns["build_prompt_from_row"](row))
        for name, ns in off["verifiers"].items():
            case["verifier_" + name] = prompt_digest(ns["build_prompt_from_row"](dict(row, generated_vqa=mcq)))
        cases.append(case)
    return cases


def main():
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    off = load_official(args.official)
    rng = random.Random(args.seed)

    texts = [model_output(rng) for _ in range(args.n_parse)]
    parse, agree = parse_cases(off, texts)
    parsed = [json.loads(c["strip"]["out"]) for c in parse if "out" in c["strip"]]
    mcq_inputs = [p for p in parsed if p is not None] + [mutated_mcq(rng) for _ in range(args.n_mcq)]
    mcq = [{"in": canon(p), **mcq_outcome(off["combine"], p)} for p in mcq_inputs]
    rubric_cases = []
    for _ in range(args.n_rubric):
        value = verification(rng)
        rubric_cases.append({"in": canon(value), **rubric_outcome(off["annotate"], value)})
    lists = [record_list(rng) for _ in range(args.n_lists)]
    rebalance = [{"in": i, **rebalance_outcome(off["rebalance"], records)} for i, records in enumerate(lists)]
    subset = []
    for i, records in enumerate(lists):
        for _ in range(3):
            k, seed = subset_size(rng, records), rng.choice([42, 42, 0, 1, 7, 2024, rng.randrange(10**6)])
            subset.append({"in": i, "k": k, "seed": seed, **subset_outcome(off["subset"], records, k, seed)})
    rows = [prompt_row(rng) for _ in range(args.n_rows)]
    normalized = [json.loads(c["out"]) for c in mcq if "out" in c]
    mcqs = [rng.choice([None, {}, rng.choice(normalized), rng.choice(normalized), rng.choice(normalized)])
            for _ in rows]
    prompts = prompt_cases(off, rows, mcqs)

    fixture = {"official_commit": OFFICIAL_COMMIT, "seed": args.seed,
               "parse_model_output_copies_agree": [agree, len(texts)],
               "cases": {"parse_json": parse, "mcq_of": mcq, "rubric_score": rubric_cases,
                         "record_lists": lists, "rebalance": rebalance, "draw_subset": subset,
                         "prompts": prompts}}
    data = json.dumps(fixture, ensure_ascii=True, separators=(",", ":")).encode()
    with open(args.output, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)  # mtime 0: the same inputs give the same bytes
    for name, cases in fixture["cases"].items():
        raises = sum("raises" in c for c in cases if isinstance(c, dict))
        print(f"{name:13s} {len(cases):5d} cases, {raises} where the official code raises")
    print(f"records: {sum(map(len, lists))}; parse_model_output copies agree on {agree}/{len(texts)}; "
          f"{args.output}: {os.path.getsize(args.output) / 1e6:.2f} MB ({len(data) / 1e6:.1f} MB of JSON)")


if __name__ == "__main__":
    main()
