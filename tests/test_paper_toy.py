"""benchmarks/paper_toy.py (make paper-toy): its job graph and its table, on recorded results.

The grid itself takes half an hour or more (README, "The paper's grid on the toy world"); here the
graph is checked for order and inputs, and the table is built from results.json files written in
evaluate.py's layout, so every number it prints can be checked by hand.
"""

import json
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import paper_toy  # noqa: E402


def test_every_job_runs_after_what_it_reads(tmp_path):
    args = paper_toy.GridArgs(output_dir=str(tmp_path), seeds=[0, 1], labs=True)
    jobs = [job for seed in args.seeds for job in paper_toy.seed_jobs(args, seed)]
    names = [job.name for job in jobs]
    assert len(names) == len(set(names))
    by_name = {job.name: job for job in jobs}
    writer = {}  # the folder of a seed each job writes -> the job
    for job in jobs:
        seed = job.name.split("/")[0]
        if job.fn is not None:
            for folder in ("train-text", "train-image", "traces-text", "traces-image"):
                writer[f"{seed}/{folder}"] = job.name
        else:
            out = job.argv[job.argv.index("--output_dir") + 1]
            writer[str(Path(out).relative_to(tmp_path))] = job.name

    def before(name):  # every job `name` waits for, directly or not
        found, todo = set(), list(by_name[name].deps)
        while todo:
            dep = todo.pop()
            if dep not in found:
                found.add(dep)
                todo += by_name[dep].deps
        return found

    seen = set()
    for job in jobs:  # the list order is a valid order, and every input is written before its reader
        assert set(job.deps) <= seen, job.name
        seen.add(job.name)
        for flag in ("--model", "--data", "--predictions"):
            if job.argv and flag in job.argv:
                parts = Path(job.argv[job.argv.index(flag) + 1]).relative_to(tmp_path).parts
                assert writer[f"{parts[0]}/{parts[1]}"] in before(job.name), (job.name, flag)
    # A seed's warm start, which the rest of its seed waits on, goes before another seed's later stages.
    rank = paper_toy.waiting_on(jobs)
    assert rank["seed1/instruct"] > rank["seed0/pass-text"] > rank["seed0/eval-rl-text"] == 0
    # Every row is scored on the chosen split; rl-image trains on all image questions (the filter keeps
    # none), rl-text on the filtered text questions, and the SFT-then-RL row starts from sft-text.
    for row in paper_toy.ROWS:
        assert "test" in by_name[f"seed1/eval-{row}"].argv
    rl_image, rl_text = by_name["seed0/rl-image"].argv, by_name["seed0/rl-text"].argv
    assert rl_image[rl_image.index("--data") + 1].endswith("seed0/train-image")
    assert rl_text[rl_text.index("--data") + 1].endswith("seed0/filtered-text")
    both = by_name["seed0/sft-text+rl-text"].argv
    assert both[both.index("--model") + 1].endswith("seed0/sft-text/final")
    # A lab is rl-text's command with its change last (argparse keeps the last value of a flag).
    lab = by_name["seed0/lab3-no-kl"].argv
    assert lab[:lab.index("--output_dir")] == rl_text[:rl_text.index("--output_dir")]
    assert lab[-2:] == ["--beta", "0"]


def write_results(folder, accuracies: dict):
    """A results.json as evaluate.py lays it out (lmms-eval's keys), with these accuracies."""
    folder.mkdir(parents=True)
    results = {name: {"alias": f" - {name}", "accuracy,none": a, "consistency,none": 1.0, "samples": 200}
               for name, a in accuracies.items()}
    average = sum(accuracies.values()) / len(accuracies)
    results["average"] = {"alias": "average", "accuracy,none": average, "samples": 600}
    (folder / "results.json").write_text(json.dumps({"results": results, "groups": {"average": results["average"]}}))


def test_the_table_gives_mean_and_std_over_seeds_beside_the_paper(tmp_path):
    # Two seeds: instruct at 0.60 / 0.70 on the text benchmarks, rl-text better on both seeds,
    # rl-image worse than sft-image on seed 1 only.
    acc = {
        "instruct": [(0.6, 0.6, 1.0), (0.7, 0.7, 1.0)],
        "sft-image": [(0.6, 0.6, 1.0), (0.7, 0.7, 1.0)],
        "rl-text": [(0.9, 0.9, 1.0), (0.95, 0.95, 1.0)],
        "rl-image": [(0.6, 0.6, 1.0), (0.65, 0.7, 1.0)],
    }
    for row, per_seed in acc.items():
        for seed, (hr, fever, lesion) in enumerate(per_seed):
            write_results(tmp_path / f"seed{seed}" / f"eval-{row}",
                          {"ToyHeartRate": hr, "ToyFever": fever, "ToyLesion": lesion})
    (tmp_path / "seed0" / "filtered-text").mkdir()
    (tmp_path / "seed0" / "filtered-text" / "curate_stats.json").write_text(json.dumps({"kept": 107}))
    summary = paper_toy.collect(tmp_path, [0, 1])
    text = paper_toy.table(summary, "test")
    lines = text.splitlines()
    instruct = next(line for line in lines if line.startswith("| instruct |"))
    # mean 0.65, sample std of (0.6, 0.7) = 0.0707; Avg per seed 0.7333 / 0.8; the paper's 0.4914
    assert instruct == ("| instruct | 0.6500 ± 0.0707 | 0.6500 ± 0.0707 | 1.0000 ± 0.0000 | 0.7667 ± 0.0471 | "
                        "0.7333 / 0.8000 | Qwen2.5-VL-3B-Instruct | 0.4914 |")
    assert not any(line.startswith("| base |") for line in lines)  # no evaluation, no row
    assert "seed 0: text 107" in text
    finding = next(line for line in lines if line.startswith("| RLVR beats SFT, image data"))
    # rl-image - sft-image: 0 on seed 0, (0.65 + 0.7 + 1) / 3 - 0.8 = -0.0167 on seed 1
    assert "+0.0000 / -0.0167" in finding and "0 of 2 seeds" in finding
    assert "| RLVR on text beats RLVR on images" in text and "2 of 2 seeds" in text
    assert "SFT then RL" not in text  # neither of its rows was evaluated
