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
    # 5 completion tokens fit in one chunk of 2048: one piece, as without chunks.
    assert m["logits"] == m["logits_unchunked"] == 5 * 151936 * 14


def test_memory_of_the_paper_step_by_hand():
    """The 3B at the defaults (FSDP2, chunks of 2048), worked out in plan.py's docstring."""
    args = plan.PlanArgs()
    config = plan.build_config("3B")
    p = plan.count_parameters(config)
    N = 3_754_622_976
    assert p["root"] == 349_380_864 and p["largest_unit"] == 77_076_992
    m = plan.memory(config, p, args)
    assert m["logits"] == 2048 * 151936 * 14 == 4_356_308_992  # one chunk, not 8 x 4096 tokens
    assert m["logits_unchunked"] == 8 * 4096 * 151936 * 14
    assert m["gathered"] == 2 * N  # the whole policy in bf16, once per rollout
    kv = 2 * 36 * 256 * 2 * 64 * 6144  # K and V, 36 layers, 2 kv heads of 128, bf16, 64 sequences
    base = 16 * N / 8 + 2 * N + 3 * plan.GIB
    assert m["peak_fsdp"] == base + 2 * N + kv and round(m["peak_fsdp"] / plan.GIB, 2) == 37.48
    update = 36 * 49152 * 2048 * 2 + 49152 * (8 * 2048 + 2 * 256 + 4 * 11008) * 2 + 4_356_308_992 \
        + 8 * 349_380_864 + 4 * 77_076_992
    assert m["update_fsdp"] == update and round(update / plan.GIB, 2) == 19.28
    # DDP: unsharded states, and autocast's bf16 copies of the decoder layers and output layer.
    copies = 2 * (2_774_771_712 + 151936 * 2048)
    assert m["peak_ddp"] == 16 * N + 2 * N + 3 * plan.GIB + copies + kv and round(m["peak_ddp"] / plan.GIB, 2) == 85.19
    assert (m["fit_micro_fsdp"], m["fit_generation_fsdp"], m["fit_generation_ddp"]) == (36, 33, 4)
    # FSDP v1: the root unit in fp32, its output layer cast to bf16, 2 layers in bf16.
    v1 = plan.memory(config, p, plan.PlanArgs(fsdp_version=1))
    assert v1["gathered"] == 4 * 349_380_864 + 2 * 151936 * 2048 + 4 * 77_076_992


def test_plan_prints_a_markdown_table(capsys):
    plan.main(["--models", "3B,7B"])
    out = capsys.readouterr().out
    assert out.startswith("| | Qwen2.5-VL-3B | Qwen2.5-VL-7B | how |")
    for row in ("| parameters | 3,754,622,976 (3.75B) | 8,292,166,656 (8.29B)", "Adam states",
                "KV cache per generate call", "update (forward + backward)", "run of 320 steps",
                "| generate: gathered params (FSDP2) | 7.0 | 15.4 |",
                "| completion logits, one chunk of 2048 tokens | 4.1 | 4.1 |",
                "| peak, FSDP2 full shard (configs/fsdp.yaml) | 37.5 (fits) | 70.3 (fits) |",
                "| peak, DDP (configs/ddp.yaml) | 85.2 (**does not fit**) | 176.2 (**does not fit**) |",
                "|   FSDP2: all-gather of the whole policy | 0.01 s | 0.03 s |"):
        assert row in out, row
    assert "FSDP v1" not in out
    plan.main(["--models", "3B", "--fsdp_version", "1", "--logprob_chunk_tokens", "0"])
    out = capsys.readouterr().out
    for row in ("| completion logits (8 x 4096 tokens) | 64.9 |", "|   floor: FSDP v1 all-gathers in decoding | 177 s |",
                "| step, FSDP v1, decoding waiting on its all-gathers | 197 s |"):
        assert row in out, row
    for bad in (["--models", "72B"], ["--fsdp_version", "3"]):
        with pytest.raises(SystemExit):
            plan.main(bad)


@pytest.mark.slow
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
    assert checks["evaluation"]["rows_per_s"] > 0 and "| evaluation | evaluate.py greedy: 4 rows x 8 new tokens" in out
    # The tiny model's head size is 16: vLLM's CPU attention refuses it, and the table says so.
    assert checks["generation_vllm"]["figure"] in (
        "skipped: vLLM not installed", "skipped: head size 16: vLLM's CPU attention needs 32 or more")
    assert all(v > 0 for v in checks["grpo"]["mfu"].values())
    # TRL's step beside grpo.py's where TRL is installed (CI's wheelhouse run has it), else said.
    trl = checks["grpo_trl"]
    assert trl.get("ratio_to_grpo", 0) > 0 or trl["figure"].startswith("skipped: TRL not installed")
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
