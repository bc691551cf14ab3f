"""`make demo` is deterministic on one machine type for a given seed and thread setting (issue 15).

What was measured (docs/demo.md, "Determinism"): the toy world (model, tokenizer, data) is byte for
byte the same in every process, whatever the thread count; an SFT run is bit for bit the same when
run again with the same number of torch threads, even on a busy machine; one thread and two threads
give different weights (fp32 sums in another order: 5e-7 after 40 steps, another model after 600).
So the Makefile fixes the demo's thread count (DEMO_THREADS, exported as OMP_NUM_THREADS), and
these tests run the stages as the demo does: separate processes, that thread count.
"""

import filecmp
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_env


def demo_threads() -> int:
    """The thread count `make demo` gives every stage (the Makefile's DEMO_THREADS default)."""
    found = re.search(r"^DEMO_THREADS \?= (\d+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile's demo section sets DEMO_THREADS ?= N"
    return int(found.group(1))


def stage(*argv, threads: int) -> None:
    env = dict(run_env(threads), OMP_WAIT_POLICY="PASSIVE")
    subprocess.run([sys.executable, *map(str, argv)], env=env, cwd=ROOT, check=True, timeout=300,
                   capture_output=True)


def files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_the_toy_world_is_the_same_in_every_process(tmp_path):
    """Model weights, the BPE tokenizer trained at run time, and every data file: equal bytes."""
    for name in ("a", "b"):
        stage(ROOT / "toy.py", "model", "--output_dir", tmp_path / name / "model", "--size", "tiny", "--seed", 3,
              threads=demo_threads())
        stage(ROOT / "toy.py", "data", "--output_dir", tmp_path / name / "data", "--n_sft", 30, "--n_train", 12,
              "--n_validation", 6, "--n_test", 6, "--seed", 3, threads=demo_threads())
    a, b = tmp_path / "a", tmp_path / "b"
    assert files(a) == files(b) and len(files(a)) > 10
    for rel in files(a):
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def test_two_short_sft_runs_give_equal_weights(tiny_model_dir, toy_data_dir, tmp_path):
    """sft.py's command line twice, as the demo runs it (one process, DEMO_THREADS threads, the
    demo's learning rate and a checkpoint on the way): equal weights, bit for bit, and equal losses."""
    for name in ("a", "b"):
        stage(ROOT / "sft.py", "--model", tiny_model_dir, "--data", toy_data_dir, "--split", "sft",
              "--output_dir", tmp_path / name, "--learning_rate", "3e-3", "--global_batch_size", 8,
              "--micro_batch_size", 8, "--max_steps", 6, "--save_steps", 3, "--seed", 1,
              "--resume", "latest", threads=demo_threads())
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["model.embed_tokens.weight"],
                           initial["model.embed_tokens.weight"]), "it trained"
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
