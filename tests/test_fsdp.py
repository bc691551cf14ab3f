"""FSDP on 2 CPU processes (issue 12, part 3; docs/real_path.md section 5).

accelerate (1.15) does not run FSDP on a CPU: with ACCELERATE_USE_CPU it sets MULTI_CPU and drops the
FSDP plugin without a word (the run is DDP over gloo), and `fsdp_sync_module_states: true` fails with
"There are currently no available devices found, must be one of 'XPU', 'CUDA', ...". The first test
pins that down. The others launch the stages through LAUNCHER, which turns on accelerate's own FSDP
branch for MULTI_CPU (the two lines accelerate runs for GPUs: the plugin and its mixed precision,
and the FSDP distributed type); everything after that is accelerate's and torch's FSDP code, with
configs/fsdp.yaml's settings (2 processes, fp32 so that one process is the reference, CPU).

What they check, against one process on the same rows:
- sft.py: losses, gradient norms and weights of 3 steps where, within a step, one process's
  micro-batch has an image and the other's has none (every FSDP unit must be all-gathered by every
  process: runtime.run_vision_on_every_forward), then a resume from a sharded checkpoint;
- grpo.py (FSDP2 and v1): every sampled completion token for token (generate under FSDP: the whole
  policy gathered once per rollout with FSDP2, root gathered + synced_gpus with v1), rewards,
  losses, gradient norms and weights, with image prompts generated on one process only, two
  optimizer steps per rollout, gradient checkpointing and chunked log-probs; and the same under
  FSDP2 with grpo.py's --share_prompt (issue 16; without engine._unshard_before_backward it fails with
  "aten.mul.Tensor got mixed torch.Tensor and DTensor").
"""

import json
import math
import os
import subprocess
import sys

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file

from transformers import AutoModelForImageTextToText, AutoProcessor

import engine
import grpo
import reward
import sft
from conftest import ROOT, run_env
from test_grpo import warm_tiny_dir  # noqa: F401 (a fixture: the tiny model taught the answer format)

# Runs a stage's command line under accelerate's FSDP on CPU processes: `python LAUNCHER stage args...`
# (stage: sft or grpo; its main(argv)). accelerate's AcceleratorState takes the FSDP branch only for GPU-like devices; for
# MULTI_CPU this does what that branch does (state.py: the plugin's mixed precision, the plugin,
# DistributedType.FSDP, also in PartialState, which later AcceleratorState() calls copy from) and
# gives the plain "cpu" device that torch's FSDP expects ("cpu:0" fails its device check). With
# RECORD set, every rollout of grpo.py (engine.Engine.rollout) is written to RECORD.<rank>.
LAUNCHER = r"""
import json, os, sys
import torch
import accelerate.state as S
from accelerate.utils import DistributedType

init = S.AcceleratorState.__init__

def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        for state in (self.__dict__, S.PartialState._shared_state):
            state["distributed_type"] = DistributedType.FSDP
            state["device"] = torch.device("cpu")

S.AcceleratorState.__init__ = fsdp_on_cpu
stage = __import__(sys.argv[1])  # sft or grpo, called with its command line as `python STAGE.py` does
record = os.environ.get("RECORD")
if record:
    import engine
    calls, rollout = [], engine.Engine.rollout
    def recorded(*args, **kwargs):
        calls.append(rollout(*args, **kwargs))
        return calls[-1]
    engine.Engine.rollout = recorded
stage.main(sys.argv[2:])
if record:
    with open(record + "." + os.environ["RANK"], "w") as f:
        json.dump(calls, f)
"""

# Log-probs under FSDP with bf16, as a GPU run computes them (a stage-like module for LAUNCHER).
BF16_LOGPROBS = r"""
import json, os, sys
import datasets, torch
from accelerate import Accelerator
from transformers import AutoModelForImageTextToText, AutoProcessor
import engine, grpo, reward, runtime

def main(argv):
    model_dir, data_dir, out = argv
    accelerator = Accelerator(mixed_precision="bf16")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    runtime.run_vision_on_every_forward(model)
    runtime.fsdp_mixed_precision(accelerator)
    policy = accelerator.state.fsdp_plugin.mixed_precision_policy
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = list(datasets.load_from_disk(data_dir)["train"])[2 * accelerator.process_index:][:2]
    samples = grpo.build_samples(processor, rows, [([353, 29, 320, 74, 274, 275], True)] * 2)
    batch = engine.collate(samples, processor.tokenizer.pad_token_id, accelerator.device)
    logp = engine.completion_logprobs(model, batch, 1.0, reward.never_generate_ids(processor.tokenizer),
                                      chunk_tokens=4)
    with open(out + "." + os.environ["RANK"], "w") as f:
        json.dump({"dtype": str(logp.dtype), "logp": logp.tolist(), "policy": [str(policy.param_dtype),
                   str(policy.reduce_dtype), str(getattr(policy, "output_dtype", None))]}, f)
"""

PROBE = """
from accelerate import Accelerator
accelerator = Accelerator()
print("DISTRIBUTED_TYPE", accelerator.distributed_type, flush=True)
"""


def cpu_config(tmp_path, version: int = 2) -> str:
    """configs/fsdp.yaml for 2 CPU processes in fp32; version 1: its FSDP (v1) equivalent."""
    with open(ROOT / "configs" / "fsdp.yaml") as f:
        config = yaml.safe_load(f)
    config.update(num_processes=2, use_cpu=True, mixed_precision="no")
    config.pop("gpu_ids", None)
    if version == 1:
        fsdp = config["fsdp_config"]
        fsdp.pop("fsdp_reshard_after_forward")
        fsdp.update(fsdp_version=1, fsdp_sharding_strategy="FULL_SHARD", fsdp_use_orig_params=True,
                    fsdp_sync_module_states=False, fsdp_backward_prefetch="BACKWARD_PRE")
    path = tmp_path / f"fsdp{version}_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def launch(tmp_path, config: str, stage: str, *args, env=None, timeout=180, launcher=None) -> str:
    """`accelerate launch --config_file CONFIG LAUNCHER STAGE ARGS` (launcher: a file of LAUNCHER's
    text with more set-up before it; default LAUNCHER itself); it must succeed. Returns its stdout."""
    if launcher is None:
        launcher = tmp_path / "launcher.py"
        launcher.write_text(LAUNCHER)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
               str(launcher), stage, *map(str, args)]
    done = subprocess.run(command, env=dict(run_env(), **(env or {})), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def metrics(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def max_difference(a_dir, b_dir) -> float:
    a, b = load_file(os.path.join(a_dir, "model.safetensors")), load_file(os.path.join(b_dir, "model.safetensors"))
    assert a.keys() == b.keys()  # the tied output layer saved once under FSDP too
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_accelerate_runs_no_fsdp_on_a_cpu(tmp_path):
    """The finding this file works around: on CPU processes the FSDP config gives DDP, silently."""
    (tmp_path / "probe.py").write_text(PROBE)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cpu_config(tmp_path),
               str(tmp_path / "probe.py")]
    done = subprocess.run(command, env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # (the two processes' lines may interleave)
    assert done.stdout.count("DistributedType.MULTI_CPU") == 2 and "FSDP" not in done.stdout


@pytest.mark.slow
def test_sft_under_fsdp_equals_one_process_and_resumes(tiny_model_dir, toy_data_dir, tmp_path):
    flags = ["--model", tiny_model_dir, "--data", toy_data_dir, "--split", "sft", "--learning_rate", "3e-3",
             "--global_batch_size", "8", "--max_steps", "3", "--save_steps", "2"]
    # The rows of each step: every step has an image (so the vision tower has a gradient in one
    # process too), and in some step one process's micro-batch has an image and the other's none.
    images = [bool(row["images"]) for row in datasets.load_from_disk(toy_data_dir)["sft"]]
    args = sft.Args(data="-", global_batch_size=8, micro_batch_size=2)
    plans = [sft.micro_batch_plan(len(images), args, 0, 3, rank=r, world=2) for r in range(2)]
    mixed = False
    for step in range(3):
        micro = [plans[r][2 * step + m] for r in range(2) for m in range(2)]  # rank 0's two, rank 1's two
        assert any(images[i] for mb in micro for i in mb)
        for m in range(2):
            has = [any(images[i] for i in micro[2 * r + m]) for r in range(2)]
            mixed |= has[0] != has[1]
    assert mixed

    config, two, one = cpu_config(tmp_path), tmp_path / "two", tmp_path / "one"
    launch(tmp_path, config, "sft", *flags, "--micro_batch_size", "2", "--output_dir", two)
    sft.main(flags + ["--micro_batch_size", "4", "--output_dir", str(one)])
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # Measured: 1.8e-8 at most (summation order of the reduce-scatter), on weights that moved by
    # 4.5e-3; 1e-6 is 50x the noise and 4,500x below the training's movement.
    assert max_difference(one / "final", two / "final") < 1e-6
    assert max_difference(one / "final", tiny_model_dir) > 1e-3
    assert (two / "checkpoint-2" / "training_state").is_dir()

    # Resume from the sharded checkpoint (model and optimizer state in torch.distributed.checkpoint
    # shards): the third step again, from checkpoint-2, ends where the uninterrupted run ended.
    finished = load_file(two / "final" / "model.safetensors")
    os.rename(two / "final", tmp_path / "final-before")
    launch(tmp_path, config, "sft", *flags, "--micro_batch_size", "2", "--output_dir", two,
           "--resume", "latest")
    assert [m["step"] for m in metrics(two)] == [1, 2, 3]
    resumed = load_file(two / "final" / "model.safetensors")
    assert max((finished[k] - resumed[k]).abs().max().item() for k in finished) < 1e-6


def test_fsdp_in_bf16_keeps_fp32_logprobs_and_reductions(warm_tiny_dir, toy_data_dir, tmp_path):  # noqa: F811
    """accelerate's bf16 policy for FSDP2 casts every output to bf16 and reduces gradients in bf16;
    runtime.fsdp_mixed_precision keeps both in fp32 (measured without it: log-probs such as
    -1.7890625, dtype bfloat16). Parameters compute in bf16, so the log-probs move by bf16 rounding
    but come out in fp32, unrounded."""
    (tmp_path / "bf16_logprobs.py").write_text(BF16_LOGPROBS)
    config = cpu_config(tmp_path).replace(".yaml", "-bf16.yaml")
    with open(cpu_config(tmp_path)) as f:
        settings = yaml.safe_load(f)
    with open(config, "w") as f:
        yaml.safe_dump(dict(settings, mixed_precision="bf16"), f)
    # rows 0-1 (text, text) on process 0, rows 2-3 (image, text) on process 1
    launch(tmp_path, config, "bf16_logprobs", warm_tiny_dir, toy_data_dir, tmp_path / "logp",
           env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    processor = AutoProcessor.from_pretrained(warm_tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(warm_tiny_dir, dtype=torch.float32).eval()
    rows = list(datasets.load_from_disk(toy_data_dir)["train"])[:4]
    samples = grpo.build_samples(processor, rows, [([353, 29, 320, 74, 274, 275], True)] * 4)
    with torch.no_grad():
        fp32 = engine.completion_logprobs(model, engine.collate(samples, processor.tokenizer.pad_token_id, "cpu"),
                                          1.0, reward.never_generate_ids(processor.tokenizer))
    for rank in (0, 1):
        with open(f"{tmp_path / 'logp'}.{rank}") as f:
            result = json.load(f)
        assert result["policy"] == ["torch.bfloat16", "torch.float32", "None"]
        logp = torch.tensor(result["logp"])
        assert result["dtype"] == "torch.float32" and not torch.equal(logp, logp.bfloat16().float())
        # bf16 parameters everywhere (norms and the vision tower included, where autocast would keep
        # fp32): measured up to 0.22 on a log-prob of -5.3 (4%), an image row; 0.02 on text rows.
        torch.testing.assert_close(logp, fp32[2 * rank:2 * rank + 2], rtol=0.08, atol=0.05)


@pytest.fixture(scope="module")
def alternating_rows(toy_data_dir, tmp_path_factory) -> str:
    """Image, text, image, text. With seed 42 the step orders are [2, 3, 0, 1] and [0, 1, 3, 2], so
    each mini-batch of 2 prompts holds one image prompt: every optimizer step trains the vision
    tower, and of 2 processes one updates on an image prompt while the other has none. With one
    prompt per generate call, process 0 generates for the image prompts of step 1, process 1 for
    the text ones."""
    out = str(tmp_path_factory.mktemp("alternating"))
    train = datasets.load_from_disk(toy_data_dir)["train"].select([2, 0, 5, 1])
    assert [bool(r["images"]) for r in train] == [True, False, True, False]
    datasets.DatasetDict({"train": train}).save_to_disk(out)
    return out


@pytest.mark.parametrize("version,share_prompt", [(2, False), (1, False), (2, True)])
def test_grpo_under_fsdp_equals_one_process(version, share_prompt, warm_tiny_dir, alternating_rows,  # noqa: F811
                                            tmp_path):
    # share_prompt: grpo.py's shared prompt (issue 16) with whole groups per micro-batch, so each
    # prompt's keys and values get their gradient from both completions (FSDP2 must gather the layer
    # first: engine._unshard_before_backward); the rollout prefills each prompt once.
    common = ["--model", warm_tiny_dir, "--data", alternating_rows, "--max_steps", "2",
              "--rollout_batch_size", "4", "--mini_batch_size", "2", "--group_size", "2",
              "--micro_batch_size", "2" if share_prompt else "1", "--share_prompt", str(share_prompt),
              "--generation_batch_size", "1", "--max_new_tokens", "14",
              "--learning_rate", "1e-3", "--beta", "0.05", "--gradient_checkpointing", "True",
              "--logprob_chunk_tokens", "5", "--save_steps", "1", "--eval_every", "2",
              "--eval_split", "train", "--eval_limit", "4", "--eval_batch_size", "1"]
    assert [p.tolist() for p in (torch.randperm(4, generator=torch.Generator().manual_seed(42 + e))
                                 for e in (0, 1))] == [[2, 3, 0, 1], [0, 1, 3, 2]]
    two, one = tmp_path / "two", tmp_path / "one"
    launch(tmp_path, cpu_config(tmp_path, version), "grpo", *common, "--output_dir", two,
           env={"RECORD": str(tmp_path / "rollouts")})
    one_rollouts, rollout = [], engine.Engine.rollout

    def recorded(*args, **kwargs):
        one_rollouts.append(rollout(*args, **kwargs))
        return one_rollouts[-1]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes: the same reductions
    engine.Engine.rollout = recorded
    try:
        grpo.main(common + ["--output_dir", str(one)])
    finally:
        engine.Engine.rollout = rollout
        torch.set_num_threads(threads)
    # Validation (4 greedy), step 1, step 2, validation: every completion token for token, on both
    # processes, although each generate call ran on one process with or without images.
    assert [len(completions) for completions in one_rollouts] == [4, 8, 8, 4]
    for rank in (0, 1):
        with open(f"{tmp_path / 'rollouts'}.{rank}") as f:
            assert json.load(f) == json.loads(json.dumps(one_rollouts)), rank
    a_metrics, b_metrics = metrics(one), metrics(two)
    assert [m["step"] for m in b_metrics] == [0, 1, 2]
    assert 0 < a_metrics[2]["reward"] < 1  # groups disagree: there was something to learn
    for a, b in zip(a_metrics, b_metrics, strict=True):
        for key in ("reward", "accuracy", "zero_advantage_groups", "val_accuracy", "completion_length"):
            if key in a:
                assert a[key] == b[key], key
        for key in ("loss", "kl", "entropy", "grad_norm"):
            if key in a:
                assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-7), key
    # Weights. After step 1 (two AdamW steps): measured 1.5e-8 at most on one version of the toy
    # data, 4.8e-6 on the next. After step 2: 1.6e-5 at most, in 41 of 195,296 entries above 1e-6:
    # embedding rows of tokens hardly ever seen and the k_proj biases, whose gradient is 0 in exact
    # arithmetic (softmax ignores a shift common to all keys): AdamW divides such a gradient by its
    # own magnitude, so rounding becomes a step of up to lr (1e-3) and another summation order moves
    # them apart. So, after each step: within 1e-4 (a tenth of lr), and all but 0.1% of the weights
    # within 1e-6; the run itself moved weights by 4e-3.
    for folder in ("checkpoint-1", "final"):
        a, b = (load_file(path / folder / "model.safetensors") for path in (one, two))
        differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert differences.max() < 1e-4 and (differences > 1e-6).float().mean() < 1e-3, folder
    assert max_difference(one / "final", warm_tiny_dir) > 1e-3
