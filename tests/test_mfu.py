"""grpo.py's model FLOPs utilisation (`mfu` in metrics.jsonl, issue 16): the parameter count, the FLOPs
per token and the ratio, worked by hand."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

import grpo


def test_matmul_parameters_leave_out_the_input_table_only(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    embedding = model.get_input_embeddings().weight
    everything = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is embedding
    expected = everything if tied else everything - embedding.numel()
    assert grpo.matmul_parameters(tiny_model_dir) == expected
    assert 0 < expected < everything or tied


def test_flops_per_token_count_the_passes_the_settings_ask_for(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(grpo, "matmul_parameters", lambda path: 1000)
    accelerator = type("A", (), {"mixed_precision": "no", "device": torch.device("cpu")})()

    def per_token(**kwargs):
        args = grpo.Args(data="-", model=tiny_model_dir, peak_flops=1e9, **kwargs)
        return grpo.step_flops(args, accelerator).per_token

    # The paper's shape: two mini-batches (logp_old pass), beta > 0 (logp_ref pass), the rollout:
    # 3 forward passes x 2N + the update's 6N = 12N.
    assert per_token(rollout_batch_size=4, mini_batch_size=2, beta=0.01) == 12 * 1000
    assert per_token(rollout_batch_size=4, mini_batch_size=4, beta=0.01) == 10 * 1000  # no logp_old pass
    assert per_token(rollout_batch_size=4, mini_batch_size=4, beta=0.0) == 8 * 1000  # nor logp_ref


def test_utilisation_by_hand():
    flops = grpo.Flops(per_token=8e6, peak=1e11)
    # 1,000 tokens x 8 MFLOP = 8 GFLOP in 0.5 s on 2 processes of 100 GFLOP/s each: 8 / 100 = 0.08.
    assert flops.utilisation(1000, 0.5, 2) == pytest.approx(0.08)


def test_matmul_peak_is_a_plausible_rate():
    peak = grpo.matmul_peak(torch.device("cpu"), torch.float32, seconds=0.05)
    assert 1e8 < peak < 1e14  # a CPU core does 1-100 GFLOP/s in fp32


def test_metrics_carry_the_mfu(tiny_model_dir, toy_data_dir, tmp_path):
    out = tmp_path / "grpo"
    grpo.main(["--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", str(out),
               "--rollout_batch_size", "2", "--group_size", "2", "--mini_batch_size", "2",
               "--micro_batch_size", "4", "--generation_batch_size", "2", "--max_new_tokens", "4",
               "--max_steps", "1", "--save_steps", "0", "--save_final", "False", "--peak_flops", "1e9",
               "--gradient_checkpointing", "False"])
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = record["time_generate"] + record["time_logprob"] + record["time_update"]
    n = grpo.matmul_parameters(tiny_model_dir)
    # One mini-batch, beta 0.01: 10 N a token; 4 samples of a toy prompt (80 to 140 tokens, image
    # included) and the logged mean completion length.
    tokens = 4 * record["completion_length"]
    assert 10 * n * (tokens + 4 * 80) / (seconds * 1e9) < record["mfu"] < 10 * n * (tokens + 4 * 140) / (seconds * 1e9)
