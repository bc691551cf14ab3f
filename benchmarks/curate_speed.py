"""Speed of each curate.py subcommand on synthetic data of real size (a benchmark, not a test).

PMC-VQA has 177k rows, m23k 23.5k. Text steps run on `--rows` (100k) synthetic schema rows with
`--samples` (16) responses a row for `filter` and `--teacher_samples` (3) for `traces`. The image
step of `prepare --pmc_csv` runs on `--pmc_rows` CSV rows that cycle through a pool of figures
(JPEG of a grey ramp + Gaussian noise of std 4: mostly 400 x 300, 5% 1600 x 1200 to
scale down, 2% 20 x 60 to scale up) and is extrapolated
linearly to 177k rows.

    python benchmarks/curate_speed.py --workdir /tmp/curate_bench
"""

import csv
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import curate  # noqa: E402


@dataclass
class BenchArgs:
    workdir: str = field(metadata={"help": "Scratch folder (emptied first)."})
    rows: int = 100_000
    samples: int = 16
    teacher_samples: int = 3
    response_chars: int = field(default=400, metadata={"help": "Think text per response."})
    pmc_rows: int = 20_000
    image_pool: int = 500
    num_proc: int | None = None


def text_set(n: int, out: str) -> list[tuple[str, int, str]]:
    import datasets

    rng = np.random.default_rng(0)
    labels = [str(x) for x in rng.choice(list("ABCD"), n)]
    options = {"A": "Bradycardia", "B": "Normal heart rate", "C": "Tachycardia", "D": "Arrhythmia"}
    data = datasets.Dataset.from_dict({
        "images": [None] * n,
        "question": [f"Question {i}: a heart rate of {40 + i % 100} bpm?" for i in range(n)],
        "options": [json.dumps(options)] * n, "answer_label": labels,
        "answer": [options[label] for label in labels], "reasoning": [None] * n,
        "dataset_name": ["Synthetic"] * n, "dataset_index": list(range(n)),
    }, features=curate.schema_features())
    data.save_to_disk(out)
    return list(zip(data["dataset_name"], data["dataset_index"], labels))


def predictions(rows, k: int, chars: int, path: str) -> None:
    """K responses a row, the i-th row with i % (k + 1) right ones (every pass count occurs)."""
    think = ("the rate is compared with the normal range. " * (chars // 44 + 1))[:chars]
    with open(path, "w") as f:
        for name, index, label in rows:
            wrong = "A" if label != "A" else "B"
            right = index % (k + 1)
            responses = [f"<think> {think} </think>\n<answer> {label if s < right else wrong} </answer>"
                         for s in range(k)]
            correct = [int(s < right) for s in range(k)]
            f.write(json.dumps({"dataset_name": name, "dataset_index": index, "answer_label": label,
                                "responses": responses, "correct": correct}) + "\n")


def figure(size, rng) -> bytes:
    width, height = size
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    ramp = ramp + np.zeros((height, 1, 3), np.float32)
    pixels = np.clip(ramp + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pmc_csv(n: int, pool: int, root: str) -> str:
    rng = np.random.default_rng(0)
    figures = os.path.join(root, "figures")
    os.makedirs(figures)
    for j in range(pool):
        size = (1600, 1200) if j % 20 == 0 else (20, 60) if j % 50 == 1 else (400, 300)
        with open(os.path.join(figures, f"fig{j}.jpg"), "wb") as f:
            f.write(figure(size, rng))
    path = os.path.join(root, "train.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(curate.PMC_COLUMNS)
        for i in range(n):
            writer.writerow([f"fig{i % pool}.jpg", f" What is shown in figure {i}? ", " Focal uptake ",
                             " A:Focal uptake ", " B:Diffuse uptake ", " C:No uptake ",
                             " D:Ring uptake ", " A "])
    return path


def timed(name: str, argv: list[str], results: dict) -> None:
    start = time.perf_counter()
    curate.main(argv)
    results[name] = time.perf_counter() - start
    print(f"--- {name}: {results[name]:.1f} s", flush=True)


def main():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(BenchArgs).parse_args_into_dataclasses()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    work = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    results, sizes = {}, {}

    rows = text_set(args.rows, work("text"))
    predictions(rows, args.samples, args.response_chars, work("pass.jsonl"))
    predictions(rows, args.teacher_samples, args.response_chars, work("teacher.jsonl"))
    sizes["pass.jsonl"] = os.path.getsize(work("pass.jsonl")) / 1e6
    csv_path = pmc_csv(args.pmc_rows, args.image_pool, work("pmc"))
    proc = ["--num_proc", str(args.num_proc)] if args.num_proc else []

    text, pmc_dir = work("text"), work("pmc")
    timed(f"prepare --data (text, {args.rows} rows)",
          ["prepare", "--data", text, "--output_dir", work("prepared")], results)
    timed(f"filter ({args.rows} rows x {args.samples}, {sizes['pass.jsonl']:.0f} MB)",
          ["filter", "--data", text, "--predictions", work("pass.jsonl"), "--output_dir", work("filtered")],
          results)
    timed(f"traces ({args.rows} rows x {args.teacher_samples})",
          ["traces", "--data", text, "--predictions", work("teacher.jsonl"), "--output_dir", work("traces")],
          results)
    timed(f"split ({args.rows} rows, n 400)",
          ["split", "--data", text, "--output_dir", work("split")], results)
    timed(f"prepare --pmc_csv ({args.pmc_rows} rows, images)",
          ["prepare", "--pmc_csv", csv_path, "--image_dir", os.path.join(pmc_dir, "figures"),
           "--output_dir", work("pmc_out"), *proc], results)
    timed(f"mix (prepared PMC + {args.rows} text rows)",
          ["mix", "--data", work("pmc_out"), text, "--output_dir", work("mix")], results)

    print("\nsubcommand | seconds | rows/s")
    for name, seconds in results.items():
        n = args.pmc_rows if "pmc_csv" in name else args.rows
        print(f"{name} | {seconds:.1f} | {n / seconds:,.0f}")
    pmc = next(s for name, s in results.items() if "pmc_csv" in name)
    print(f"prepare --pmc_csv extrapolated to 177k rows: {pmc * 177_000 / args.pmc_rows / 60:.1f} min")


if __name__ == "__main__":
    main()
