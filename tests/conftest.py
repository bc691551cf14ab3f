"""Shared fixtures: the tiny toy model and a small toy data set, built once per test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Spin-waiting OpenMP threads make generate about 25x slower when another process is busy
# (docs/method.md section 9); tests that start subprocesses also give each one thread.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import toy  # noqa: E402

TEST_SIZES = dict(n_sft=48, n_train=48, n_validation=24, n_test=24)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny Qwen2.5-VL (model + processor), as `python toy.py model --size tiny` makes it."""
    return save_toy_model(str(tmp_path_factory.mktemp("tiny_model")), "tiny")


def save_toy_model(out: str, size: str) -> str:
    """`python toy.py model --output_dir out --size size`, in this process."""
    model, processor = toy.build_model(toy.ModelArgs(output_dir=out, size=size))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> str:
    """A saved toy DatasetDict with splits sft, train, validation, test."""
    out = tmp_path_factory.mktemp("toy_data")
    toy.build_data(toy.DataArgs(output_dir=str(out), **TEST_SIZES)).save_to_disk(str(out))
    return str(out)


def run_env(threads: int = 1) -> dict:
    """Environment for a subprocess of a test: one thread, offline, CPU forced."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), ACCELERATE_USE_CPU="true",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return env


# A grpo.py run that also records every rollout it sampled: `python recorder.py OUT grpo-args...`
# writes OUT.<RANK>, the completions of each Engine.rollout call in order (tests of N processes
# against one).
RECORDER = """
import json, os, sys
import engine, grpo
calls, rollout = [], engine.Engine.rollout
def recorded(self, *args, **kwargs):
    calls.append(rollout(self, *args, **kwargs))
    return calls[-1]
engine.Engine.rollout = recorded
grpo.main(sys.argv[2:])
with open(sys.argv[1] + "." + os.environ.get("RANK", "0"), "w") as f:
    json.dump(calls, f)
"""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: an end-to-end run of half a minute or more; `make test-slow` runs them, "
                   "`make test` the rest (CI runs both)")
