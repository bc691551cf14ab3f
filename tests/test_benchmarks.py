"""benchmarks/plan.py (the cost of the paper's GRPO step) and benchmarks/gpu_check.sh --cpu (issue 12)."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import plan  # noqa: E402


def test_exact_parameter_counts_of_the_released_models():
    # The model cards' counts: 3.75B (tied output layer) and 8.29B (vocabulary 152,064, untied).
    three = plan.count_parameters(plan.build_config("3B"))
    seven = plan.count_parameters(plan.build_config("7B"))
    assert three["total"] == 3_754_622_976 and three["tied"]
    assert seven["total"] == 8_292_166_656 and not seven["tied"]
    assert three["head"] == 151936 * 2048 and seven["head"] == 152064 * 3584
    # Total = decoder layers + vision tower + embedding (+ output layer when untied) + final norm.
    assert three["total"] == three["layers"] + three["vision"] + three["embedding"] + 2048
    assert seven["total"] == seven["layers"] + seven["vision"] + seven["embedding"] + seven["head"] + 3584


def test_flops_and_memory_by_hand():
    args = plan.PlanArgs(prompts=2, group_size=2, mini_batch=2, mean_prompt_tokens=10, mean_new_tokens=5,
                         max_prompt_tokens=10, max_new_tokens=5, micro_batch_size=1, generation_batch_size=1,
                         n_gpus=2)
    config = plan.build_config("3B")
    p = dict(plan.count_parameters(config), layers=100, head=10)
    f = plan.step_flops(config, p, args)
    width, L = 2048, 36
    # Causal attention: the 10 prompt tokens see 1..10 keys (55 pairs); the 5 new ones 11..15 (65).
    assert plan.attention_flops(L, width, 0, 10) == 4 * L * width * 55
    assert plan.attention_flops(L, width, 10, 5) == 4 * L * width * 65
    forward = 2 * 100 * 15 + 2 * 10 * 5 + 4 * L * width * 120
    assert f["update"] == 4 * 3 * forward  # 4 sequences, 6N (+ 3x attention)
    assert f["logprob"] == 4 * forward and f["logprob_passes"] == 1  # on-policy: reference pass only
    assert f["generate"] == 4 * (2 * 100 * 10 + 2 * 110 * 5 + 4 * L * width * 120)
    m = plan.memory(config, p, args)
    assert m["kv_per_token"] == 2 * L * 2 * 128 * 2  # K and V, 2 kv heads of 128, bf16
    assert m["kv_cache"] == m["kv_per_token"] * 2 * 15  # one prompt x G = 2 sequences
    assert m["adam"] == 8 * p["total"] / 2 and m["reference"] == 2 * p["total"]


def test_plan_prints_a_markdown_table(capsys):
    plan.main(["--models", "3B,7B"])
    out = capsys.readouterr().out
    assert out.startswith("| | Qwen2.5-VL-3B | Qwen2.5-VL-7B | how |")
    for row in ("| parameters | 3,754,622,976 (3.75B) | 8,292,166,656 (8.29B)", "Adam states",
                "KV cache per generate call", "update (forward + backward)", "run of 320 steps"):
        assert row in out, row
    with pytest.raises(SystemExit):
        plan.main(["--models", "72B"])


def test_gpu_check_runs_on_the_cpu(tmp_path):
    """`bash benchmarks/gpu_check.sh --cpu`: the GPU check's code on the tiny real-tokenizer model."""
    import json
    import subprocess

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from conftest import run_env

    work = tmp_path / "check"
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--workdir", str(work), "--keep"],
                            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    out = result.stdout
    assert "| generation | evaluate.py: 4 prompts x 2 samples x 8 new tokens" in out
    assert "tokens/s" in out and "log-probs" in out and "update" in out and "MFU" in out and "GiB" in out
    checks = json.loads((work / "gpu_check.json").read_text())["checks"]
    assert checks["generation"]["tokens_per_s"] > 0 and checks["sft"]["seconds"] > 0
    assert all(v > 0 for v in checks["grpo"]["mfu"].values())
    # Every GRPO sample ran to the limit: the end-of-turn ids are banned by the saved generation_config.
    assert checks["grpo"]["completion_length"] == 8
    # No checkpoints were written (grpo.py and sft.py would write them at the end of a run).
    assert checks["grpo"]["report"]["checkpoints_skipped"] and checks["sft"]["report"]["checkpoints_skipped"]
    assert not (work / "grpo" / "final").exists() and not (work / "sft" / "final").exists()

    # The ban holds under explicit sampling settings (as evaluate.py and grpo.py pass them):
    # generate takes sequence_bias, which they leave unset, from the checkpoint.
    processor = AutoProcessor.from_pretrained(work / "model")
    model = AutoModelForImageTextToText.from_pretrained(work / "model").eval()
    batch = processor(text=["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=4,
                             repetition_penalty=1.0, suppress_tokens=[151644], output_scores=True,
                             return_dict_in_generate=True)
    scores = torch.stack(out.scores)
    assert torch.isinf(scores[..., [151645, 151643, 151644]]).all()
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + 4
