"""reward.py against the official grading functions themselves, on random completions.

Not a test: it needs a checkout of the official repository, which the project does not ship.

    git clone https://github.com/UCSC-VLAA/MedVLThinker /tmp/MedVLThinker   # commit a3163b1
    .venv/bin/python benchmarks/official_rules.py --official /tmp/MedVLThinker --n 100000

The official files import packages this project does not need (click, dotenv, vllm, ...), so the
grading functions are taken out of them with `ast` and run on their own, unchanged. Prints, for each
rule, on how many completions ours and theirs agree.
"""

import ast
import os
import random
import re
import sys
from dataclasses import dataclass

from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward  # noqa: E402


@dataclass
class Args:
    official: str  # a checkout of UCSC-VLAA/MedVLThinker
    n: int = 100_000
    seed: int = 0


def official_functions(path: str, names: tuple[str, ...]) -> dict:
    """The named top-level functions of an official file, executed in a namespace of their own."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    keep = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    namespace = {"re": re}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)
    return namespace


# Fragments where the rules differ: tags, markers in several cases, line breaks of every kind,
# Unicode whitespace and letters that case-fold onto ASCII ones, answers with stray spaces.
FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "answer:", "Answer is:", "ANSWER IS",
             "is:", "The answer is", "A", "B", "C. Fever", "c. fever", "Fever", " fever ", "b", "\n",
             "\r", "\r\n", " ", "  ", "\t", "\u2028", "\x85", "\xa0", "İ", "ſ", "K", "answer",
             "<answer", "think>", ".", "A.", "D. x", "x", "Final answer: B", "is: C", "\n\n",
             "<answer> B </answer>", "<think> reasoning </think>", "C.  Fever"]
LABELS = [("C", "Fever"), ("C", " Fever"), ("C ", "Fever"), (" C", "Fever "), ("c", "FEVER"),
          ("B", "x")]


def completion(rng: random.Random, i: int) -> str:
    """Free text, a well-formatted frame around free text, or text ending in an answer."""
    def free(most):
        return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, most)))
    if i % 3 == 0:
        return free(14)
    if i % 3 == 1:
        return ("<think>" + free(8) + "</think>" + rng.choice(["", "\n", " \n "]) + "<answer>" + free(3)
                + "</answer>")
    return (rng.choice(["", " ", "\n"]) + free(6) + rng.choice(["<answer>", "answer: ", "The answer is "])
            + rng.choice(["C", " c ", "C. Fever", "Fever", "C.  Fever", "c.fever"])
            + rng.choice(["</answer>", "", "\n"]) + free(3))


def main():
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    train = official_functions(os.path.join(args.official, "train/my_reward.py"),
                               ("format_reward", "accuracy_reward", "grade_answer", "compute_score"))
    regrade = official_functions(os.path.join(args.official, "analysis/regrade_eval_results.py"),
                                 ("_extract_answer", "extract_answer", "grade_answer"))
    offline = official_functions(os.path.join(args.official, "eval/run_offline_inference.py"),
                                 ("extract_answer", "grade_answer"))
    rng = random.Random(args.seed)
    agree = dict(reward=0, extract_answer=0, is_correct=0, pass_correct=0, think_text=0)
    for i in range(args.n):
        s = completion(rng, i)
        label, answer = rng.choice(LABELS)
        theirs = train["compute_score"](None, s, answer, {"answer": answer, "answer_label": label})
        agree["reward"] += theirs == reward.reward(s, label, answer)
        extracted = regrade["extract_answer"](s)
        agree["extract_answer"] += extracted == reward.extract_answer(s)
        agree["is_correct"] += (regrade["grade_answer"](extracted, answer, label)
                                == reward.is_correct(reward.extract_answer(s), label, answer))
        text = s.strip()  # the official inference script strips the output before grading
        theirs = offline["grade_answer"](offline["extract_answer"](text), answer, label)
        agree["pass_correct"] += theirs == reward.pass_correct(s, label, answer)
        think = re.search(r"<think>(.*?)</think>", s, re.DOTALL)  # merge_pmc_vqa_cot.py's rule
        agree["think_text"] += (think.group(1).strip() if think else None) == reward.think_text(s)
    for name, count in agree.items():
        print(f"{name:15s} {count}/{args.n} equal")


if __name__ == "__main__":
    main()
