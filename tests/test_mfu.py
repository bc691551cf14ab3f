"""grpo.py's model FLOPs utilisation (`mfu` in metrics.jsonl): the parameter count, the FLOPs a step
needs and the ratio, worked by hand.

The FLOPs a step needs: 2 N a token for each forward pass without gradient (the rollout; logp_old
when there are several mini-batches; logp_ref when beta > 0) and 6 N a token for the update's forward
and backward, N the parameters a token multiplies by. The tokens of a pass are every completion token
and each group's prompt once (the shared prompt computes it once for the group's G samples)."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

import grpo
import runtime


def test_matmul_parameters_leave_out_the_input_table_only(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    embedding = model.get_input_embeddings().weight
    everything = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is embedding
    expected = everything if tied else everything - embedding.numel()
    assert runtime.matmul_parameters(tiny_model_dir) == expected
    assert 0 < expected < everything or tied


class OneProcess:
    """The accelerator step_record sees on one CPU process: gather returns the process's own rows."""

    mixed_precision, device, num_processes = "no", torch.device("cpu"), 1

    @staticmethod
    def gather(tensor):
        return tensor


def two_groups() -> list[grpo.Sample]:
    """Two groups of G = 2: prompts of 10 and 20 tokens, completions of 3 + 5 and 4 + 8 tokens."""
    samples = []
    for prompt, completions in ((10, (3, 5)), (20, (4, 8))):
        for length in completions:
            samples.append(grpo.Sample(
                prompt_ids=torch.ones(prompt, dtype=torch.long), mm_token_type_ids=torch.zeros(prompt),
                pixel_values=None, image_grid_thw=None, completion_ids=torch.ones(length, dtype=torch.long),
                truncated=False, answer_label="A", answer="yes", text="A"))
    return samples


def test_flops_count_the_passes_the_settings_ask_for(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(runtime, "matmul_parameters", lambda path: 1000)
    flops = runtime.flops_of(tiny_model_dir, OneProcess, peak_flops=1e6)
    assert (flops.parameters, flops.peak) == (1000, 1e6)
    updates = {"sums": torch.ones(len(grpo.STATS)), "grad_norms": [1.0], "skips": []}
    times = {"generate": 0.4, "score": 0.1, "logprob": 0.2, "update": 0.3}  # 1 s in all

    def mfu(**kwargs):
        args = grpo.Args(data="-", model=tiny_model_dir, group_size=2, **kwargs)
        return grpo.step_record(OneProcess, 1, 1.0, two_groups(), updates, times, 1e-6, args, flops)["mfu"]

    # A pass computes each group's prompt once and every completion token: 10 + 20 + (3 + 5 + 4 + 8) =
    # 50 tokens. The paper's shape: two mini-batches (logp_old pass), beta > 0 (logp_ref pass), the
    # rollout: 3 forward passes x 2N + the update's 6N = 12N a token, 12 x 1000 x 50 = 600,000 FLOPs
    # in 1 s of a 1 MFLOP/s device: 0.6.
    assert mfu(rollout_batch_size=4, mini_batch_size=2, beta=0.01) == pytest.approx(0.6)
    assert mfu(rollout_batch_size=4, mini_batch_size=4, beta=0.01) == pytest.approx(0.5)  # no logp_old pass
    assert mfu(rollout_batch_size=4, mini_batch_size=4, beta=0.0) == pytest.approx(0.4)  # nor logp_ref


def test_a_shared_prompt_is_counted_once_per_group(tiny_model_dir):
    """G = 8 samples of a 1,000-token prompt, 10 completion tokens each: a pass computes 1,000 + 80 =
    1,080 tokens, not 8 x 1,010 = 8,080. With one mini-batch and beta 0: 2N + 6N = 8N a token, N =
    1000: 8,640,000 FLOPs. A step that takes the time the device needs for them has mfu 1, where
    counting the prompt once per sample would claim 8,080 / 1,080 = 7.48 times what the device can do."""
    samples = [grpo.Sample(prompt_ids=torch.ones(1000, dtype=torch.long), mm_token_type_ids=torch.zeros(1000),
                           pixel_values=None, image_grid_thw=None, completion_ids=torch.ones(10, dtype=torch.long),
                           truncated=False, answer_label="A", answer="yes", text="A") for _ in range(8)]
    updates = {"sums": torch.ones(len(grpo.STATS)), "grad_norms": [1.0], "skips": []}
    times = {"generate": 4.0, "score": 0.32, "logprob": 0.0, "update": 4.32}  # 8.64 s
    args = grpo.Args(data="-", model=tiny_model_dir, group_size=8, rollout_batch_size=1, mini_batch_size=1,
                     beta=0.0)
    record = grpo.step_record(OneProcess, 1, 1.0, samples, updates, times, 1e-6, args,
                              runtime.Flops(parameters=1000, peak=1e6))
    assert record["mfu"] == pytest.approx(1.0)


def test_utilisation_by_hand():
    flops = runtime.Flops(parameters=1e6, peak=1e11)
    # 1,000 tokens of one pass without gradient (2N) and of the update (6N): 1,000 x 8 MFLOP = 8 GFLOP
    # in 0.5 s on 2 processes of 100 GFLOP/s each: 8 / 100 = 0.08.
    assert flops.utilisation(1000, 1000, 0.5, 2) == pytest.approx(0.08)
    # Two passes without gradient over the same 1,000 tokens: (2 x 2 + 6) x 1 MFLOP x 1,000 = 10 GFLOP.
    assert flops.utilisation(2000, 1000, 0.5, 2) == pytest.approx(0.1)


def test_matmul_peak_is_a_plausible_rate():
    peak = runtime.matmul_peak(torch.device("cpu"), torch.float32, seconds=0.05)
    assert 1e8 < peak < 1e14  # a CPU core does 1-100 GFLOP/s in fp32


def test_metrics_carry_the_mfu(tiny_model_dir, toy_data_dir, tmp_path):
    out = tmp_path / "grpo"
    grpo.main(["--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", str(out),
               "--rollout_batch_size", "2", "--group_size", "2", "--mini_batch_size", "2",
               "--micro_batch_size", "4", "--generation_batch_size", "2", "--max_new_tokens", "4",
               "--max_steps", "1", "--save_steps", "0", "--save_final", "False", "--peak_flops", "1e9",
               "--gradient_checkpointing", "False"])
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(record[f"time_{phase}"] for phase in ("generate", "score", "logprob", "update"))
    n = runtime.matmul_parameters(tiny_model_dir)
    # One mini-batch, beta 0.01: 2 passes x 2N + 6N = 10 N a token; 4 samples with the logged mean
    # completion length, and 2 groups whose toy prompt (80 to 140 tokens, image included) counts once.
    tokens = 4 * record["completion_length"]
    assert 10 * n * (tokens + 2 * 80) / (seconds * 1e9) < record["mfu"] < 10 * n * (tokens + 2 * 140) / (seconds * 1e9)
    # Against what this device does (the measured matmul rate, as a run without --peak_flops uses),
    # the step's count of FLOPs, each group's prompt once, cannot exceed 1.
    peak = runtime.matmul_peak(torch.device("cpu"), torch.float32)
    assert 0 < record["mfu"] * 1e9 / peak <= 1
