"""GRPO from scratch in plain PyTorch: the RLVR stage of MedVLThinker (arXiv 2508.02669).

The paper trains Qwen2.5-VL on multiple-choice questions with a binary, verifiable reward
(reward.py) and Group Relative Policy Optimization (GRPO). One training step, numbered as the
sections of this file (docs/method.md section 5 has every formula; the defaults of `Args` are the
paper's settings):

1. take the step's B prompts (each epoch a fixed permutation of the data);
2. sample G completions for each at temperature T (the rollout);
3. score each completion with `reward.reward` (1 for a well-formatted, correct answer, else 0) and
   give it its reward against its group as advantage: A_i = (r_i - mean) / (std + 1e-6);
4. log-probs of the sampled tokens under the sampling policy (logp_old) and under the frozen
   starting model (logp_ref), once, without gradients;
5. B / mini-batch optimizer steps, each minimising over the tokens of its mini-batch
       token-mean of  max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))  [capped at -A c when A < 0]
                      + beta * k3(logp_ref, logp),            rho = exp(logp - logp_old),
   with gradient accumulation over micro-batches and data parallelism over processes;
6. log the step's metrics, and every --eval_every steps the greedy accuracy on a held-out slice.

`main`, at the end of the file, is the table of contents: the loop is these six steps. A reader of
the algorithm may skip the last four sections: "The shared prompt" computes the numbers of steps 2,
4 and 5 with each group's prompt run once instead of G times (--share_prompt; the rollout and the
log-prob passes call it), "Rollouts with vLLM" is the optional engine of step 2 (--engine vllm; the
rollout hands its work to it), section 7 lists every place where processes meet (the rollout calls one of
its functions, `full_parameters`), section 8 is plumbing (set-up, the numerical guard, checkpoints,
logs). Every other function is defined before its first use.

Run on one process (`python grpo.py --model M --data D --output_dir DIR`, or `python grpo.py
config.yaml` with flags overriding the file) or on several with `accelerate launch --config_file
configs/{single_gpu,ddp,fsdp}.yaml grpo.py ...`. Which prompts share a generate call, each call's
sampling seed, and which prompts form each mini-batch are functions of positions in the step's batch
only, never of the number of processes, so one process and several sample the same completions and
reach the same weights (up to floating-point summation order).

Before any model work every row is checked once, and the output folder is claimed for this run
(docs/method.md section 10). Everything a run computes is kept when it stops: `DIR/metrics.jsonl` (a
line per step), `DIR/checkpoint-{step}/` (model + processor via save_pretrained, `training_state/`
and `trainer_state.json` for `--resume`), `DIR/final/`. A loss or gradient that is not finite skips
its optimizer step; several in a row stop the run, naming the step.

What was verified where (docs/real_path.md): everything ran on CPUs: fp32 and bf16 (autocast, a bf16
reference); one and two gloo processes under DDP; two gloo processes under accelerate's FSDP2 and
FSDP v1 (tests/test_fsdp.py, through a wrapper: accelerate runs FSDP on GPUs only), including
generate with images on one process only. Nothing ran on a GPU, NCCL or several nodes when this was
written.
"""

import contextlib
import importlib.util
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from accelerate.utils import broadcast_object_list, gather_object
from PIL import Image
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, DynamicCache, get_scheduler
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

import reward


@dataclass
class Args:
    """Defaults are the paper's settings (docs/method.md section 5); better variants are flags, off by
    default."""

    data: str = field(metadata={"help": "Schema dataset: save_to_disk folder, parquet/jsonl or hub id."})
    model: str = field(default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={
        "help": "Starting policy (hub id or save_pretrained folder); also the frozen KL reference."})
    split: str = "train"
    output_dir: str = "runs/grpo"
    on_bad_row: str = field(default="error", metadata={
        "help": "error: stop, naming every bad row. skip: leave them out, listed in bad_rows.jsonl."})
    # Rollout (paper: 256 prompts x 8 samples per step, T 1.0, top_p 1.0, no top_k).
    rollout_batch_size: int = field(default=256, metadata={"help": "B: prompts per step, all processes."})
    group_size: int = field(default=8, metadata={"help": "G: samples per prompt (at least 2)."})
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_length: int = field(default=2048, metadata={"help": "Longer prompts are skipped, never cut."})
    max_new_tokens: int = 4096
    generation_batch_size: int = field(default=8, metadata={
        "help": "Prompts per generate call (consecutive prompts of the step; calls are dealt to processes)."})
    engine: str = field(default="hf", metadata={
        "help": "hf: transformers' generate (the reference). vllm: the rollouts and validation's greedy "
                "answers from vLLM in this process, its weights synced after every update (section "
                "'Rollouts with vLLM'; `make install-vllm`, docs/vllm.md). One process only."})
    vllm_memory: float = field(default=0.3, metadata={
        "help": "--engine vllm: gpu_memory_utilization, the share of the GPU vLLM may take for its copy "
                "of the weights and its KV cache (the policy, reference and optimizer share the GPU)."})
    vllm_sleep: bool = field(default=True, metadata={
        "help": "--engine vllm on a GPU: after each rollout vLLM sleeps (level 2: its weights and KV cache "
                "freed for the log-prob passes and the update) and wakes before the next, the policy's "
                "weights pushed again. No effect on a CPU (vLLM's CPU backend has no sleep mode)."})
    # Update (paper: mini-batch 128 prompts, i.e. 2 optimizer steps per rollout).
    mini_batch_size: int = field(default=128, metadata={"help": "Prompts per optimizer step, all processes."})
    micro_batch_size: int = field(default=8, metadata={"help": "Sequences per forward (per process)."})
    share_prompt: bool = field(default=True, metadata={
        "help": "Compute each group's prompt (and its image) once instead of once per sample: in the "
                "rollout's prefill, the log-prob passes and the update (the section 'The shared prompt'). "
                "The same numbers up to fp32 rounding, with less time and memory; each micro-batch computes "
                "each of its prompts once, so --micro_batch_size a multiple of --group_size (whole groups) "
                "saves the most. False: every sequence computes its own prompt (the plain path, kept as the "
                "readable reference)."})
    logprob_chunk_tokens: int = field(default=2048, metadata={
        "help": "Completion tokens whose vocabulary log-softmax is computed at once (0: all of a "
                "micro-batch). The same log-probs; about 14 bytes x vocabulary per token of a chunk "
                "(2048 tokens: 4 GiB at Qwen2.5-VL's 151,936, instead of 65 GiB for 8 x 4096)."})
    mixed_precision: str = field(default="auto", metadata={
        "help": "auto: bf16 autocast on a GPU (the paper), fp32 on a CPU. bf16: bf16 autocast anywhere "
                "(a CPU with bf16 support included). no: fp32. The policy's weights stay fp32 (the "
                "optimizer's master copy); the reference model is loaded in bf16 when this is bf16. "
                "This flag wins over an accelerate config's mixed_precision (as sft.py's)."})
    learning_rate: float = 1e-6
    lr_scheduler_type: str = field(default="constant", metadata={"help": "A transformers scheduler name."})
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    beta: float = field(default=0.01, metadata={"help": "k3 KL weight; 0 loads no reference model."})
    eps_low: float = 0.2
    eps_high: float = field(default=0.2, metadata={"help": "0.28 is clip-higher (DAPO); the paper: 0.2."})
    dual_clip: float = field(default=3.0, metadata={"help": "c of verl's dual clip for A < 0."})
    scale_rewards: bool = field(default=True, metadata={"help": "False: A = r - mean (Dr. GRPO)."})
    loss_agg: str = field(default="token-mean", metadata={"help": "token-mean or seq-mean-token-mean."})
    gradient_checkpointing: bool = True
    # Length of training (paper, m23k: 5 epochs = 320 steps; PMC-VQA: 1 epoch).
    num_epochs: int = field(default=5, metadata={"help": "Passes over the data."})
    max_steps: int = field(default=-1, metadata={"help": "> 0: this many steps, not epochs."})
    seed: int = field(default=42, metadata={
        "help": "Seeds the data order (a permutation per epoch) and every generate call's sampler."})
    # Validation: greedy accuracy on a held-out slice (the paper used 400 items of the eval set).
    eval_every: int = field(default=0, metadata={"help": "Validate every N steps, first and last; 0: never."})
    eval_data: str | None = field(default=None, metadata={"help": "Default: --data."})
    eval_split: str = "validation"
    eval_limit: int = 400
    eval_seed: int = field(default=42, metadata={
        "help": "Seed of the shuffle that picks the --eval_limit rows (apart from --seed, so that runs of "
                "every --seed validate on one slice)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per greedy generate call."})
    # Checkpoints and logs.
    save_steps: int = 50
    save_dtype: str = field(default="auto", metadata={
        "help": "dtype of the model files written (final/ and the model of each checkpoint-{step}/): "
                "bfloat16, float32, or auto: bfloat16 after a bf16 run (as the hub checkpoints), float32 "
                "after an fp32 one. training_state/ always keeps the fp32 master weights for resuming."})
    save_final: bool = field(default=True, metadata={
        "help": "Write final/ (model and processor) when the run completes. False: nothing at the end "
                "(benchmarks). A run that completes never writes its optimizer state: nothing resumes "
                "a finished run."})
    save_total_limit: int | None = field(default=None, metadata={
        "help": "Keep only the newest N checkpoint-{step} folders (default: all, as transformers does)."})
    resume: str | None = field(default=None, metadata={
        "help": "A checkpoint-{step} folder, or 'latest' (the newest complete one in --output_dir; the "
                "run starts afresh when there is none, and a finished run is left as it is)."})
    report_to: str = field(default="none", metadata={"help": "none, tensorboard or wandb."})
    peak_flops: float = field(default=0.0, metadata={
        "help": "FLOP/s of one process's device, the denominator of `mfu` in metrics.jsonl; 0: measured "
                "once at the start on a large matmul in the compute dtype (`matmul_peak`)."})
    # Numerical guard (docs/method.md section 10).
    max_skipped_steps: int = field(default=3, metadata={
        "help": "Stop after this many optimizer steps in a row skipped for a non-finite loss or "
                "gradient norm (0: never stop)."})
    collapse_steps: int = field(default=5, metadata={
        "help": "Warn when for this many steps in a row no completion has the answer format and every "
                "group's rewards are equal (0: never)."})

    @property
    def updates_per_step(self) -> int:
        """B / M: optimizer steps per rollout (the paper: 256 / 128 = 2)."""
        return self.rollout_batch_size // self.mini_batch_size

    def check(self, world_size: int):
        if self.temperature <= 0:
            raise ValueError("--temperature must be above 0: GRPO samples, and its log-probs divide by it")
        if self.group_size < 2:
            raise ValueError("--group_size must be at least 2: a group of one has no baseline")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError("--rollout_batch_size must be a multiple of --mini_batch_size")
        if self.mini_batch_size % world_size:
            raise ValueError(f"--mini_batch_size must be a multiple of the {world_size} processes "
                             "(each process updates on whole groups)")
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean"):
            raise ValueError(f"--loss_agg must be token-mean or seq-mean-token-mean, got {self.loss_agg!r}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"--on_bad_row must be error or skip, got {self.on_bad_row!r}")
        if self.save_dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"--save_dtype must be auto, bfloat16 or float32, got {self.save_dtype!r}")
        if self.logprob_chunk_tokens < 0:
            raise ValueError("--logprob_chunk_tokens must be 0 (no chunks) or more")
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"--engine must be hf or vllm, got {self.engine!r}")
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:  # before any work
            raise SystemExit("--engine vllm needs vLLM, which is not installed: run `make install-vllm` "
                             "(CPU; docs/vllm.md) or see requirements-vllm.txt (GPUs)")
        if self.engine == "vllm" and world_size > 1:
            raise ValueError("--engine vllm runs in one process (one colocated vLLM engine; several "
                             "processes are not done yet): run it with python, not accelerate launch")


# Fields of Args that never change what a run computes, so they stay out of its fingerprint
# (reward.claim_output_dir): where things are (the fingerprints of the data and the model path stand
# for them), how often and how much is saved or logged, how a batch is cut into forward passes (the
# loss is exact under any split), the guard's thresholds, and --on_bad_row (with "error" a run with
# bad rows never starts, so either value trains on the same rows). Every other field is a setting.
# --share_prompt is not one either: it computes the same numbers another way (in fp64 the two paths
# agree to 1e-15, tests/test_shared_prompt.py), and its fp32 rounding is the size of the one a change
# of --micro_batch_size makes (1 to 2 ulp of a log-prob), which is not a setting either. So a run
# resumed with the other value continues the same run, up to rounding; and the next default (True)
# will not lock the run folders made before it out of --resume.
NOT_SETTINGS = ("model", "data", "eval_data", "output_dir", "resume", "save_steps", "save_total_limit",
                "report_to", "micro_batch_size", "eval_batch_size", "gradient_checkpointing", "on_bad_row",
                "eval_every", "max_skipped_steps", "collapse_steps", "logprob_chunk_tokens", "save_dtype",
                "save_final", "share_prompt", "peak_flops", "vllm_memory", "vllm_sleep")
# The checkpoint contract (docs/method.md section 10), the same as sft.py's.
TRAINING_STATE = "training_state"  # accelerator.save_state: model, optimizer, scheduler, RNG of every process
TRAINER_STATE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------
# 1. Prompts: every row checked once, then the step's B prompts
# ---------------------------------------------------------------------------------------------


def prompt_length(row, processor, base_dir: str) -> int:
    """Tokens of a row's chat prompt, its image tokens included, without running the image processor.

    The chat template holds one <|image_pad|> per image, which the processor expands to
    patches / merge^2 tokens; the number of patches follows from the image's size alone.
    """
    text = processor.apply_chat_template(reward.build_messages(row), add_generation_prompt=True,
                                         tokenize=False)
    n_tokens = len(processor.tokenizer(text)["input_ids"])
    merge = processor.image_processor.merge_size
    for item in row.get("images") or []:
        image = item if isinstance(item, Image.Image) else reward.open_image(item, base_dir)
        patches = processor.image_processor.get_number_of_image_patches(image.height, image.width)
        n_tokens += patches // merge**2 - 1
    return n_tokens


def usable_prompts(dataset, data: str, split: str, processor, args: Args, accelerator):
    """The rows that can be prompts, and the skipped ones as reward.check_rows lists them.

    Every row passes `reward.check_rows` once, before any model work (docs/method.md section 10): a
    bad row is an error naming it, or with --on_bad_row skip a counted skip. GRPO adds one rule of
    its own, whatever --on_bad_row says: a prompt longer than --max_prompt_length is skipped and
    counted, never cut (cutting would drop image tokens or the options). The main process checks;
    the others receive its verdict.
    """
    where = f"{data}:{split}"
    verdict = [None]
    if accelerator.is_main_process:
        base_dir = reward.data_dir(data)
        good, bad = reward.check_rows(dataset, args.on_bad_row, base_dir,
                                      progress=partial(tqdm, desc=f"checking {where}", leave=False))
        kept = []
        for i in tqdm(good, desc=f"measuring the prompts of {where}", leave=False):
            row = dataset[i]
            n_tokens = prompt_length(row, processor, base_dir)
            if n_tokens <= args.max_prompt_length:
                kept.append(i)
            else:
                bad.append({"position": i, "dataset_name": row.get("dataset_name"),
                            "dataset_index": row.get("dataset_index"),
                            "reason": f"{reward.row_name(row)}: prompt of {n_tokens} tokens > "
                                      f"max_prompt_length {args.max_prompt_length}"})
        verdict = [(kept, [dict(b, data=where) for b in bad])]
    kept, bad = broadcast_object_list(verdict)[0]
    if bad:
        too_long = sum("max_prompt_length" in b["reason"] for b in bad)
        accelerator.print(f"{where}: skipped {len(bad)} of {len(dataset)} rows ({too_long} prompts longer "
                          f"than --max_prompt_length, {len(bad) - too_long} bad rows), listed in "
                          f"bad_rows.jsonl; first: {bad[0]['reason']}")
    if not kept:
        raise ValueError(f"{where}: no usable row (all {len(dataset)} skipped)")
    # keep_in_memory: an index written to disk would land in the input's folder (never written into).
    return dataset.select(kept, keep_in_memory=True), bad


def validation_slice(args: Args):
    """The validation set: a fixed random slice of --eval_limit rows (shuffled with --eval_seed: eval
    sets are ordered by benchmark), held in memory so that no index file is written into the data's
    folder."""
    eval_set = reward.load_split(args.eval_data or args.data, args.eval_split)
    if args.eval_limit < len(eval_set):
        eval_set = eval_set.shuffle(seed=args.eval_seed, keep_in_memory=True)
        eval_set = eval_set.select(range(args.eval_limit), keep_in_memory=True)
    return eval_set


def step_rows(dataset, step: int, args: Args, base_dir: str) -> list[dict]:
    """The B prompts of a step, in the step's order, their images decoded (reward.check_row).

    Each epoch is a permutation drawn from (seed, epoch); the step number is the data position, so a
    resumed run reads exactly the prompts the uninterrupted run would (the last partial batch of an
    epoch is dropped). Every process reads the same B rows: which process generates a prompt's group
    and which one updates on it is decided by its position in this list (`rollout`, `update_share`).
    """
    steps_per_epoch = len(dataset) // args.rollout_batch_size
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + epoch))
    batch = order[k * args.rollout_batch_size:(k + 1) * args.rollout_batch_size]
    return [reward.check_row(dataset[int(i)], base_dir) for i in batch]


def update_share(args: Args, rank: int, world: int) -> list[int]:
    """Positions, among the step's B prompts, of the prompts whose groups this process updates on.

    Mini-batch k is prompts [kM, (k+1)M) of the step whatever the number W of processes (M =
    --mini_batch_size); process r takes the r-th block of M / W consecutive prompts of each. A
    process so holds whole groups, and its micro-batches are consecutive samples of its blocks.
    """
    share = args.mini_batch_size // world
    return [k + rank * share + i for k in range(0, args.rollout_batch_size, args.mini_batch_size)
            for i in range(share)]


# ---------------------------------------------------------------------------------------------
# 2. Rollout: G samples per prompt
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One completion with everything the later passes need (tensors on the CPU, unpadded)."""

    prompt_ids: torch.Tensor  # [P]
    mm_token_type_ids: torch.Tensor  # [P]: 0 text, 1 image
    pixel_values: torch.Tensor | None  # [patches, dim] of this prompt's images
    image_grid_thw: torch.Tensor | None  # [images, 3]
    completion_ids: torch.Tensor  # [C]: up to and including the first end-of-turn token
    truncated: bool  # no end-of-turn token within max_new_tokens
    answer_label: str = ""
    answer: str = ""
    text: str = ""  # the completion, decoded
    reward: float = 0.0  # step 3 (`score`)
    advantage: float = 0.0  # step 3
    old_logp: torch.Tensor | None = None  # [C], step 4 (`old_and_ref_logprobs`)
    ref_logp: torch.Tensor | None = None  # [C], step 4


def sampling_kwargs(args: Args, never_ids: list[int]) -> dict:
    """The rollout's generate settings, every one explicit (reward.generation_kwargs): the sampled
    distribution is the softmax(logits / T) cut by top_p that the log-prob pass computes."""
    return reward.generation_kwargs(args.temperature, args.top_p, args.max_new_tokens, never_ids)


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True up to and including the first end-of-turn token of each row, after it False.

    By position, never from the pad id: the pad id may be an end token too (docs/method.md section 9).
    A row without an end token (truncated) is all True.
    """
    is_end = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    ends_before = is_end.long().cumsum(-1) - is_end.long()  # end tokens strictly before t
    return ends_before == 0


def cut_completions(completions: torch.Tensor, eos_ids: list[int]) -> list[tuple[list[int], bool]]:
    """generate's new tokens [n, L] -> per row (its tokens up to and including the first end-of-turn
    token, truncated: no end token at all)."""
    completions = completions.cpu()
    mask = completion_mask(completions, eos_ids)
    truncated = ~torch.isin(completions, torch.tensor(eos_ids)).any(-1)
    return [(row[keep].tolist(), bool(cut)) for row, keep, cut in zip(completions, mask, truncated)]


def build_samples(processor, rows: list[dict], completions: list[tuple[list[int], bool]]) -> list[Sample]:
    """Samples of `rows` (G adjacent completions each) with their prompt tensors, unpadded.

    The prompt tensors come from the processor, one row at a time: exactly the unpadded part of the
    generate call's inputs, and the same whichever process generated the completions.
    """
    group_size = len(completions) // len(rows)
    texts = processor.batch_decode([ids for ids, _ in completions], skip_special_tokens=True)
    samples = []
    for i, row in enumerate(rows):
        prompt_texts, images = reward.chat_prompts(processor, [row])
        inputs = processor(text=prompt_texts, images=images or None, return_tensors="pt")
        for j in range(i * group_size, (i + 1) * group_size):
            ids, truncated = completions[j]
            samples.append(Sample(
                prompt_ids=inputs["input_ids"][0], mm_token_type_ids=inputs["mm_token_type_ids"][0],
                pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                completion_ids=torch.tensor(ids, dtype=torch.long), truncated=truncated,
                answer_label=row["answer_label"], answer=row["answer"], text=texts[j]))
    return samples


@torch.no_grad()
def rollout(model, accelerator, processor, rows: list[dict], group_size: int, batch_size: int,
            gen_kwargs: dict, eos_ids: list[int], seed: tuple[int, int] | None = None,
            desc: str | None = None, share_prompt: bool = False,
            engine: "VLLMRollouts | None" = None) -> list[tuple[list[int], bool]]:
    """G completions of every row, on every process; row i's are completions [i G, (i + 1) G).

    Batching is a function of positions in `rows` only, so the rollout is the same on any number of
    processes (docs/method.md section 5): generate call k takes rows [k b, (k + 1) b) (b =
    batch_size), each repeated G times, left padded; call k runs on process k mod W, its sampler
    seeded from (run seed, step, k b); then every process receives every completion (token ids
    only, a few bytes a token). seed: (run seed, step), or None when greedy. Each completion is (its
    tokens up to and including the first end-of-turn token, truncated: no end token within
    max_new_tokens). desc: a progress bar of that name over the main process's prompts.
    share_prompt: each call prefills its rows once, not G times (`reward.generate_shared`): the same
    samples for the same seed. engine: with --engine vllm, the same completions come from vLLM instead
    (the section "Rollouts with vLLM"); this function's code below is then not run.
    """
    if engine is not None:
        return engine.rollout(accelerator.unwrap_model(model), processor, rows, group_size, gen_kwargs,
                              eos_ids, seed)
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()  # gradient checkpointing is off in eval mode, so generate keeps its KV cache
    world, rank = accelerator.num_processes, accelerator.process_index
    # FSDP (v1) gathers layers inside generate (full_parameters): every process must join every
    # all-gather, so each makes the same number of calls (the extra ones repeat the first call and
    # are dropped) and keeps stepping until all are done (synced_gpus). FSDP2 has gathered it all.
    sync = accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2 and world > 1
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    calls = list(range(0, len(rows), batch_size))
    mine = calls[rank::world]
    padding = calls[:1] * (math.ceil(len(calls) / world) - len(mine)) if sync else []
    shared = share_prompt and group_size > 1  # validation's greedy rollouts (G = 1): nothing to share
    local = []
    bar = tqdm(total=sum(len(rows[start:start + batch_size]) for start in mine), desc=desc, unit="prompt",
               leave=False, disable=desc is None or not accelerator.is_main_process)
    with full_parameters(model, accelerator):
        for k, start in enumerate(mine + padding):
            chunk = rows[start:start + batch_size]
            texts, images = reward.chat_prompts(processor, chunk if shared else
                                                [row for row in chunk for _ in range(group_size)])
            inputs = processor(text=texts, images=images or None, padding=True, padding_side="left",
                               return_tensors="pt").to(accelerator.device)
            with torch.random.fork_rng(devices=cuda):
                if seed is not None:
                    torch.manual_seed(reward.sampling_seed(*seed, start))
                if shared:
                    sequences = reward.generate_shared(unwrapped, inputs, group_size, **gen_kwargs,
                                                       synced_gpus=sync)
                else:
                    sequences = unwrapped.generate(**inputs, **gen_kwargs, synced_gpus=sync)
            if k < len(mine):
                local.append((start, cut_completions(sequences[:, inputs["input_ids"].shape[1]:], eos_ids)))
                bar.update(len(chunk))
    bar.close()
    unwrapped.train(was_training)
    by_start = dict(gather_object(local))
    return [completion for start in calls for completion in by_start[start]]


# ---------------------------------------------------------------------------------------------
# 3. Rewards and advantages
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + 1e-6), std unbiased; r_i - mean_g r without scaling.

    `rewards` [N] holds groups of `group_size` adjacent samples; returns [N]. A group whose rewards
    are all equal gets A = 0: it teaches nothing. `scale_rewards=False` is Dr. GRPO's variant.
    """
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-6)
    return advantages.view(-1)


def score(samples: list[Sample], group_size: int, scale_rewards: bool) -> None:
    """Each sample's reward (`reward.reward`) and its advantage within its group (`group_advantages`);
    `samples` holds whole groups of `group_size` adjacent samples."""
    for s in samples:
        s.reward = reward.reward(s.text, s.answer_label, s.answer)
    advantages = group_advantages(torch.tensor([s.reward for s in samples]), group_size, scale_rewards)
    for s, advantage in zip(samples, advantages.tolist()):
        s.advantage = advantage


# ---------------------------------------------------------------------------------------------
# 4. Log-probs of the sampled tokens
# ---------------------------------------------------------------------------------------------


def collate(samples: list[Sample], pad_id: int, device) -> dict:
    """A micro-batch: prompts left-padded, completions right-padded, images concatenated.

    Positions are left to the model, from `attention_mask` and `mm_token_type_ids` (zeros for the
    completion): Qwen2.5-VL's 3-D positions for a batch with images, plain ones otherwise. Those
    count text-only rows from the first column rather than from the first real token as generate
    does; rotary attention depends only on relative positions, so the log-probs are the same (the
    test compares them with generate's scores).
    """
    n = len(samples)
    P = max(len(s.prompt_ids) for s in samples)
    C = max(len(s.completion_ids) for s in samples)
    input_ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, P + C), dtype=torch.long)
    mm_token_type_ids = torch.zeros((n, P + C), dtype=torch.long)  # completion tokens are text: 0
    for i, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        input_ids[i, P - p:P], input_ids[i, P:P + c] = s.prompt_ids, s.completion_ids
        attention_mask[i, P - p:P + c] = 1
        mm_token_type_ids[i, P - p:P] = s.mm_token_type_ids
    with_images = [s for s in samples if s.pixel_values is not None]
    batch = dict(
        input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
        # A micro-batch without images sends no pixel_values at all (docs/method.md section 9).
        pixel_values=torch.cat([s.pixel_values for s in with_images]) if with_images else None,
        image_grid_thw=torch.cat([s.image_grid_thw for s in with_images]) if with_images else None,
    )
    batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
    batch["completion_ids"] = batch["input_ids"][:, P:]
    batch["completion_mask"] = batch["attention_mask"][:, P:].bool()
    return batch


def pad_rows(rows: list[torch.Tensor], mask: torch.Tensor, device) -> torch.Tensor:
    """Per-sample 1-D tensors right-padded (with 0, masked out anyway) to the micro-batch's [n, C]."""
    out = torch.zeros(mask.shape, device=device)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row.to(device)
    return out


def token_logprobs(logits, targets, temperature: float, never_ids: list[int], with_entropy: bool):
    """log_softmax(logits / T)[target] with the never-generated ids at -inf, in fp32; [..., V] -> [...].
    With entropy: the entropy of each distribution too (without gradient, for the logs), else zeros."""
    logits = logits.float() / temperature
    logits[..., never_ids] = -math.inf
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    entropy = torch.zeros_like(logp.detach())
    if with_entropy:
        with torch.no_grad():
            entropy = torch.special.entr(logits.softmax(-1)).sum(-1)
    return logp, entropy


@contextlib.contextmanager
def logprob_head(model, targets, temperature: float, never_ids: list[int], chunk_tokens: int,
                 with_entropy: bool):
    """While open, the model's output layer returns the log-probs of `targets` [n, C] (and the
    entropies) as [n, C, 2] instead of logits [n, C + 1, V], computed `chunk_tokens` tokens at a time.

    Why: the logits of a micro-batch are [n, C, V] (V = 151,936 for Qwen2.5-VL), about 14 bytes per
    entry alive between the output layer, the fp32 copy, the log-softmax and its backward: 65 GiB for
    8 completions of 4096 tokens (docs/real_path.md). Chunked, only one chunk's logits exist at a
    time: each chunk is projected, log-softmaxed and reduced to one number per token, and under
    gradient it runs in torch.utils.checkpoint, so its logits are computed again in the backward pass
    instead of being kept. Every token's log-prob is that of the whole computation (the log-softmax
    is per token; tests/test_grpo.py compares them bit for bit; the output layer's gradient adds the
    chunks' parts in another order). A micro-batch of at most `chunk_tokens` completion tokens is one
    piece, computed exactly as without chunks (the toy demo's 32 x 64 tokens, for one). The swap is
    inside the model's own forward, so DDP's and FSDP's hooks and accelerate's autocast see an
    ordinary forward pass.
    """
    head = getattr(model, "module", model).get_output_embeddings()  # under DDP/FSDP: the wrapped model's
    project = head.forward

    def piece(hidden, ids):
        logp, entropy = token_logprobs(project(hidden), ids, temperature, never_ids, with_entropy)
        return torch.stack([logp, entropy], -1)

    def forward(hidden):  # [n, C + 1, H]: position t predicts token t + 1
        n, C = targets.shape
        hidden, ids = hidden[:, :-1].reshape(n * C, -1), targets.reshape(-1)
        size = chunk_tokens or max(n * C, 1)
        pieces = []
        for start in range(0, n * C, size):
            args = (hidden[start:start + size], ids[start:start + size])
            if torch.is_grad_enabled() and size < n * C:  # one chunk: nothing to gain from recomputing
                pieces.append(checkpoint(piece, *args, use_reentrant=False))
            else:
                pieces.append(piece(*args))
        return torch.cat(pieces).view(n, C, 2)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def completion_logprobs(model, batch: dict, temperature: float, never_ids: list[int],
                        with_entropy: bool = False, chunk_tokens: int = 0):
    """log pi(o_t | q, o_<t) for the completion positions only: log_softmax(logits / T)[o_t].

    docs/method.md section 5: the logits are divided by the sampling temperature T, and the ids the
    sampler suppresses are set to -inf, so these are the log-probs of the distribution sampled from.
    Only the C + 1 last hidden states reach the vocabulary projection (`logits_to_keep`), and they
    reach it `chunk_tokens` tokens at a time (`logprob_head`; 0: all at once): no [batch, prompt +
    completion, vocab] logits ever exist, nor [batch, completion, vocab] ones with chunks. Returns
    logp [n, C] (and, when asked, the entropy of each position's distribution, without gradient, for
    the logs).
    """
    with logprob_head(model, batch["completion_ids"], temperature, never_ids, chunk_tokens, with_entropy):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    mm_token_type_ids=batch["mm_token_type_ids"],
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    use_cache=False, logits_to_keep=batch["completion_ids"].shape[1] + 1)
    logp, entropy = out.logits.unbind(-1)
    return (logp, entropy) if with_entropy else logp


def logprob_pass(args: Args):
    """(collate, log-prob function) of a micro-batch: the plain ones above, or with --share_prompt
    the shared prompt's (`collate_shared`, `shared_completion_logprobs`): the same batch keys the
    loss reads (completion_ids, completion_mask) and the same [n, C] log-probs."""
    if args.share_prompt:
        return collate_shared, shared_completion_logprobs
    return collate, completion_logprobs


@torch.no_grad()
def sequence_logprobs(model, samples: list[Sample], args: Args, pad_id: int, never_ids: list[int],
                      device) -> list[torch.Tensor]:
    """logp of every sample's completion, micro-batch by micro-batch, without gradients."""
    collate_fn, logprobs = logprob_pass(args)
    out = []
    for start in range(0, len(samples), args.micro_batch_size):
        micro = samples[start:start + args.micro_batch_size]
        batch = collate_fn(micro, pad_id, device)
        logp = logprobs(model, batch, args.temperature, never_ids,
                        chunk_tokens=args.logprob_chunk_tokens).cpu()
        out += [row[:len(s.completion_ids)] for row, s in zip(logp, micro)]
    return out


def old_and_ref_logprobs(model, ref_model, samples: list[Sample], args: Args, pad_id: int,
                         never_ids: list[int], device) -> None:
    """logp_old (the sampling policy's) and logp_ref (the frozen reference's) of every sample, once
    per rollout, without gradients. With one mini-batch per rollout there is no logp_old pass: the
    policy has not moved since sampling, and `accumulate_gradients` uses the detached current logp."""
    model.eval()
    if args.updates_per_step > 1:
        for s, logp in zip(samples, sequence_logprobs(model, samples, args, pad_id, never_ids, device)):
            s.old_logp = logp
    if ref_model is not None:
        for s, logp in zip(samples, sequence_logprobs(ref_model, samples, args, pad_id, never_ids, device)):
            s.ref_logp = logp


# ---------------------------------------------------------------------------------------------
# 5. The update: the GRPO objective, token-mean over micro-batches and processes
# ---------------------------------------------------------------------------------------------


def policy_loss(logp, old_logp, advantages, mask, eps_low: float, eps_high: float, dual_clip: float):
    """Per-token clipped surrogate with verl's dual clip; [N, L], zero where mask is False.

        rho  = exp(clamp(logp - old_logp, -20, 20))
        loss = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))
        loss = min(loss, -A c)   where A < 0   (dual clip, c = dual_clip)

    `advantages` [N] is broadcast to every token of its sequence. Not aggregated.
    """
    A = advantages.unsqueeze(-1)
    rho = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    loss = torch.max(-A * rho, -A * torch.clamp(rho, 1 - eps_low, 1 + eps_high))
    loss = torch.where(A < 0, torch.min(loss, -A * dual_clip), loss)
    return torch.where(mask, loss, torch.zeros_like(loss))


def clipped_tokens(logp, old_logp, advantages, mask, eps_low: float, eps_high: float, dual_clip: float):
    """Which tokens each clip silenced (their gradient is zero), for the logs of `policy_loss`.

    clip_low: A < 0 and rho < 1 - eps_low; clip_high: A > 0 and rho > 1 + eps_high;
    dual: A < 0 and rho > c (then -A rho > -A c and the cap holds).
    """
    A = advantages.unsqueeze(-1)
    rho = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    return {"clip_low": (A < 0) & (rho < 1 - eps_low) & mask,
            "clip_high": (A > 0) & (rho > 1 + eps_high) & mask,
            "clip_dual": (A < 0) & (rho > dual_clip) & mask}


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref), verl's "low_var_kl" (docs/method.md section 5):

        d = clamp(ref_logp - logp, -20, 20);   kl = clamp(exp(d) - d - 1, -10, 10)
    """
    d = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)


# What `accumulate_gradients` returns for the logs, each summed over the tokens of a mini-batch on
# every process: the loss, the k3 KL, the tokens each clip silenced, the entropy, the tokens.
STATS = ("loss", "kl", "clip_low", "clip_high", "clip_dual", "entropy", "tokens")


def accumulate_gradients(model, accelerator, samples: list[Sample], args: Args, pad_id: int,
                         never_ids: list[int], on_policy: bool) -> dict[str, torch.Tensor]:
    """Backward of one mini-batch's loss, micro-batch by micro-batch; returns its STATS, summed
    over its micro-batches and over processes (fp32 scalars).

    Token-mean, exact under accumulation and data parallelism: with T the number of completion
    tokens of the mini-batch on all processes (all-reduced before any backward) and W processes,
    each micro-batch m backpropagates  W * sum_{tokens of m} loss_t / T.  DDP averages gradients over
    the W processes, so the sum over micro-batches and processes is  grad( sum_all loss_t / T ).
    seq-mean-token-mean: each micro-batch backpropagates  W * sum_{seq i of m} mean_t loss_it / S,
    with S the number of sequences of the mini-batch on all processes.
    When on_policy (one mini-batch per rollout), logp_old is the detached current logp: the
    policy has not moved since sampling, so rho = 1 and its separate pass would only recompute it.
    """
    device, world = accelerator.device, accelerator.num_processes
    local = [sum(len(s.completion_ids) for s in samples), len(samples)]
    n_tokens, n_seqs = accelerator.reduce(torch.tensor(local, dtype=torch.float, device=device), "sum")
    totals = torch.zeros(len(STATS), device=device)
    size = args.micro_batch_size
    micro_batches = [samples[i:i + size] for i in range(0, len(samples), size)]
    collate_fn, logprobs = logprob_pass(args)
    for k, micro in enumerate(micro_batches):
        batch = collate_fn(micro, pad_id, device)
        mask = batch["completion_mask"]
        advantages = torch.tensor([s.advantage for s in micro], device=device)
        # Gradients are all-reduced on the last micro-batch only. FSDP must reduce-scatter every
        # time (not syncing would keep full unsharded gradients), so it always syncs.
        last = k == len(micro_batches) - 1
        no_sync = not last and accelerator.distributed_type != DistributedType.FSDP
        with accelerator.no_sync(model) if no_sync else contextlib.nullcontext():
            logp, entropy = logprobs(model, batch, args.temperature, never_ids, with_entropy=True,
                                     chunk_tokens=args.logprob_chunk_tokens)
            old_logp = logp.detach() if on_policy else pad_rows([s.old_logp for s in micro], mask, device)
            per_token = policy_loss(logp, old_logp, advantages, mask, args.eps_low, args.eps_high,
                                    args.dual_clip)
            kl = torch.zeros_like(logp)
            if args.beta > 0:
                kl = torch.where(mask, kl_k3(logp, pad_rows([s.ref_logp for s in micro], mask, device)), kl)
                per_token = per_token + args.beta * kl
            if args.loss_agg == "token-mean":
                loss = per_token.sum() * world / n_tokens
            else:
                loss = (per_token.sum(-1) / mask.sum(-1)).sum() * world / n_seqs
            accelerator.backward(loss)
        clipped = clipped_tokens(logp.detach(), old_logp, advantages, mask, args.eps_low, args.eps_high,
                                 args.dual_clip)
        stats = dict(loss=loss.detach() / world, kl=kl.detach().sum(), clip_low=clipped["clip_low"].sum(),
                     clip_high=clipped["clip_high"].sum(), clip_dual=clipped["clip_dual"].sum(),
                     entropy=(entropy.detach() * mask).sum(), tokens=mask.sum())
        totals += torch.stack([stats[name] for name in STATS]).float()
    return dict(zip(STATS, accelerator.reduce(totals, "sum")))


@dataclass
class Updates:
    """What the optimizer steps of one training step leave for its metrics."""

    sums: dict[str, torch.Tensor]  # STATS of the applied optimizer steps, summed
    grad_norms: list[float]  # of the applied optimizer steps
    skips: list[str]  # why each skipped optimizer step was skipped


def update(model, accelerator, optimizer, scheduler, samples: list[Sample], args: Args, pad_id: int,
           never_ids: list[int], guard) -> Updates:
    """B / M optimizer steps; step k trains on this process's share of mini-batch k.

    An optimizer step whose loss or gradient norm is not finite is skipped (the numerical guard,
    `Guard`): its gradients are dropped, and neither AdamW nor the scheduler steps. The loss is
    summed over processes and the norm is global, so all processes decide alike.
    """
    model.train()
    n = len(samples) // args.updates_per_step
    done = Updates({name: torch.zeros((), device=accelerator.device) for name in STATS}, [], [])
    for k in range(args.updates_per_step):
        stats = accumulate_gradients(model, accelerator, samples[k * n:(k + 1) * n], args, pad_id, never_ids,
                                     on_policy=args.updates_per_step == 1)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if torch.isfinite(stats["loss"]) and torch.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
            done.sums = {name: done.sums[name] + stats[name] for name in STATS}
            done.grad_norms.append(float(grad_norm))
            guard.skipped_in_a_row = 0
        else:
            done.skips.append(f"update {k + 1} of {args.updates_per_step}: loss {float(stats['loss']):.4g}, "
                              f"grad_norm {float(grad_norm):.4g}")
            guard.skipped_in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
    return done


# ---------------------------------------------------------------------------------------------
# 6. Logs and validation
# ---------------------------------------------------------------------------------------------
# synced_time and peak_memory_gb, which sft.py uses too, are in reward.py section 5.


class Timer:
    """Seconds per phase of a training step (`lap`), each phase's queued GPU work included; the
    peak memory is counted from the start of the step."""

    def __init__(self, device):
        self.device, self.times = device, {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.start = reward.synced_time(device)

    def lap(self, name: str) -> None:
        now = reward.synced_time(self.device)
        self.times[name], self.start = now - self.start, now


@dataclass
class Flops:
    """Model FLOPs utilisation of a step: the FLOPs the GRPO step needs over the FLOP/s available.

    Needed: 2 N a token for each forward pass without gradient (the rollout, whose prefill and decoding
    each run every token once; logp_old when there are several mini-batches; logp_ref when beta > 0)
    and 6 N a token for the update's forward and backward: the 6 N estimate of Kaplan et al. (2020,
    section 2.1), N the parameters a token multiplies by (`matmul_parameters`), the attention's
    context term left out (an estimate to compare steps and runs, not a profiler's count). Tokens are
    prompt + completion of every sample, each sample's prompt counted as the plain path computes it:
    --share_prompt does less of that work, so its saving shows as a higher utilisation. Available:
    `peak` per process (`matmul_peak`, or --peak_flops) x processes x the step's seconds.
    """

    per_token: float  # model FLOPs a token of a sample costs in one step
    peak: float  # FLOP/s of one process's device

    def utilisation(self, tokens: float, seconds: float, processes: int) -> float:
        return self.per_token * tokens / max(seconds * self.peak * processes, 1e-9)


def matmul_parameters(model_path: str) -> int:
    """Parameters a token multiplies by: all but the input embedding table (a lookup), the output
    layer included even when it shares that table (tied, as in Qwen2.5-VL-3B). Counted on the meta
    device from the config: no weights are read, and FSDP's sharding cannot hide any."""
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_path))
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    return total if model.get_output_embeddings().weight is embedding else total - embedding.numel()


def matmul_peak(device, dtype, seconds: float = 0.5) -> float:
    """FLOP/s of this device on square matmuls in the compute dtype, measured: the best a step's
    matmuls can reach here (a data sheet's peak is higher, so MFU against it is lower)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    start, runs = reward.synced_time(device), 0
    while reward.synced_time(device) - start < seconds:
        for _ in range(4):
            a @ b
        runs += 4
    return 2 * n ** 3 * runs / (reward.synced_time(device) - start)


def step_flops(args: Args, accelerator) -> Flops:
    """The run's `Flops`: FLOPs per token from the passes `args` asks for, the device's peak."""
    passes_without_grad = 1 + (args.updates_per_step > 1) + (args.beta > 0)
    per_token = (2 * passes_without_grad + 6) * matmul_parameters(args.model)
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    return Flops(per_token, args.peak_flops or matmul_peak(accelerator.device, dtype))


def step_record(accelerator, step: int, epoch: float, samples: list[Sample], updates: Updates,
                times: dict, lr: float, group_size: int, flops: "Flops") -> dict:
    """A step's line of metrics.jsonl: the rollout's statistics over every process's samples, the
    update's per token of its applied optimizer steps (None when every one was skipped), and the
    slowest process's time per phase, peak memory and model FLOPs utilisation (`Flops`)."""
    device = accelerator.device
    per_sample = accelerator.gather(torch.tensor(
        [[s.reward, float(reward.is_correct(reward.extract_answer(s.text), s.answer_label, s.answer)),
          float(reward.format_ok(s.text)), len(s.completion_ids), float(s.truncated), len(s.prompt_ids)]
         for s in samples], device=device)).cpu()
    rewards, correct, formatted, lengths, truncated, prompt_lengths = per_sample.unbind(1)
    slowest = accelerator.gather(torch.tensor([[times["generate"], times["logprob"], times["update"],
                                                reward.peak_memory_gb(device)]], device=device)).max(0).values
    time_generate, time_logprob, time_update, memory = slowest.tolist()
    sums, applied = updates.sums, len(updates.grad_norms)
    tokens = sums["tokens"].clamp(min=1)

    def per_token(name):  # None when every update of the step was skipped
        return (sums[name] / tokens).item() if applied else None

    return {
        "step": step, "epoch": epoch,
        "reward": rewards.mean().item(), "accuracy": correct.mean().item(),
        "format_rate": formatted.mean().item(),
        "zero_advantage_groups": (rewards.view(-1, group_size).std(dim=1) == 0).float().mean().item(),
        "loss": (sums["loss"] / applied).item() if applied else None, "kl": per_token("kl"),
        "clip_low": per_token("clip_low"), "clip_high": per_token("clip_high"),
        "clip_dual": per_token("clip_dual"), "entropy": per_token("entropy"),
        "completion_length": lengths.mean().item(), "completion_length_max": lengths.max().item(),
        "truncated": truncated.mean().item(),
        "grad_norm": float(np.mean(updates.grad_norms)) if applied else None,
        "skipped": bool(updates.skips),
        **({"skip_reason": "; ".join(updates.skips)} if updates.skips else {}),
        "lr": lr,
        "time_generate": time_generate, "time_logprob": time_logprob, "time_update": time_update,
        "tokens_per_s": lengths.sum().item() / max(time_generate, 1e-9),
        "mfu": flops.utilisation((lengths + prompt_lengths).sum().item(),
                                 time_generate + time_logprob + time_update, accelerator.num_processes),
        "peak_memory_gb": memory,
    }


def validate(model, accelerator, processor, rows, args: Args, never_ids, eos_ids, engine=None) -> dict:
    """Greedy accuracy with the evaluation rule (reward.extract_answer, docs/method.md section 4).

    `rollout` gives every process every completion, so all of them compute the same numbers. The
    progress bar counts the main process's prompts (all of them on one process).
    """
    greedy = reward.generation_kwargs(0, args.top_p, args.max_new_tokens, never_ids)  # temperature 0
    completions = rollout(model, accelerator, processor, rows, 1, args.eval_batch_size, greedy, eos_ids,
                          desc="validating", engine=engine)
    texts = processor.batch_decode([ids for ids, _ in completions], skip_special_tokens=True)
    correct = torch.tensor([float(reward.is_correct(reward.extract_answer(text), row["answer_label"],
                                                    row["answer"])) for text, row in zip(texts, rows)])
    names = [row.get("dataset_name", "") for row in rows]
    metrics = {"val_accuracy": correct.mean().item()}
    for name in sorted(set(names)):
        metrics[f"val_accuracy/{name}"] = correct[[n == name for n in names]].mean().item()
    return metrics


# ---------------------------------------------------------------------------------------------
# The shared prompt (--share_prompt): steps 2, 4 and 5 with each group's prompt computed once
# (a reader of the algorithm may skip this: the numbers are those of the plain path)
# ---------------------------------------------------------------------------------------------
# Why the numbers are the same (issue 16; the idea is published for GRPO as a shared-prefix forward,
# "Prefix Grouper"). In a causal decoder the hidden state, key and value at position t depend only on
# the tokens at positions <= t, their rotary positions and the image features they hold. The G
# samples of a group share their prompt q (the same tokens, left padding and image), so every
# layer's keys and values over q are the same G times over. Here they are computed once per prompt
# (the *prompt pass*, over q[:-1], image included) and repeated G times along the batch; each sample
# then runs [q[-1], o_0 .. o_{C-1}] against them (the *completion pass*) with
#  - the plain path's mask: the 2-D mask [prompt mask | completion mask] of `collate` (transformers'
#    causal mask offsets its causal part by the cache length P - 1);
#  - the plain path's rotary positions, passed explicitly (never left to the model's `rope_deltas`
#    state): with an image in the micro-batch Qwen2.5-VL's 3-D positions from `get_rope_index` on the
#    prompts, the completion continuing at (prompt tokens + rope delta) + t, which is where
#    `get_rope_index` over prompt + completion puts it (completion tokens are text); with no image,
#    the column index, as in the plain forward;
#  - the plain path's outputs: the completion pass's C + 1 outputs are those of columns P - 1 ..
#    P + C - 1 of the plain forward (`logits_to_keep=C + 1`), so `logprob_head` applies unchanged.
# Gradients: the repetition K -> K.repeat_interleave(G) has the sum over the G copies as its adjoint,
# so the prompt pass receives the sum of the G completions' gradients with respect to its keys and
# values and backpropagates it once; the plain path backpropagates G identical prompt computations
# and sums them in the weights' gradients. The prompt's backward is linear in its incoming gradient,
# so both are the same sum, taken at another point: only the floating-point order differs. Measured
# (tests/test_shared_prompt.py): in fp64 the paths agree to ~1e-15; in fp32 log-probs differ by 1 to
# 2 ulp (~1e-6), as much as the plain path moves when only --micro_batch_size changes.
#
# What it saves: the prompt's forward and backward (and the vision tower on its image) run once per
# group per micro-batch instead of G times; the completions attend to the same P + C keys as before.
# Memory: the prompt's activations are held once per group instead of G times; each completion-pass
# layer still builds the [G, kv heads, P + C, head dim] keys and values its attention needs (and, with
# gradient, the attention saves them, as the plain path saves its own). In the rollout the KV cache is
# G x P as before (repeated after the prefill): only the prefill's work is saved. That prefill is
# `reward.generate_shared`, which evaluate.py's --share_prompt uses for its n samples too.
#
# --micro_batch_size keeps its meaning (sequences per forward) and its cuts. Micro-batches are
# consecutive samples, so with a multiple of G they are whole groups (`update_share` gives each
# process whole groups) and each prompt runs exactly once; otherwise a group cut by a micro-batch
# boundary has its prompt computed once in each piece: still exact, less saved. A shared micro-batch
# needs less memory than a plain one of the same size (measured on the toy models: 0.4 to 0.66 of
# it), so a larger one may fit.
#
# Verified on CPUs in fp32: one process and DDP on two gloo processes (tests/test_shared_prompt.py);
# FSDP2 on two gloo processes against one process (tests/test_fsdp.py); FSDP v1 likewise, once, by
# hand. Not run: a GPU, bf16 autocast, flash-attention with a cache and left padding.


def prompt_runs(samples: list[Sample]) -> list[int]:
    """Lengths of the runs of consecutive samples with the same prompt (tokens and images).

    A group's G samples are adjacent, so a micro-batch of whole groups is runs of G; any cut works
    (a group split across two micro-batches has its prompt computed once in each), and two adjacent
    groups of the same question share one computation, just as exactly.
    """
    def same(a, b):
        return a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))

    runs = []
    for i, s in enumerate(samples):
        prev = samples[i - 1] if i else None
        if prev is not None and all(same(getattr(prev, k), getattr(s, k)) for k in (
                "prompt_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")):
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def collate_shared(samples: list[Sample], pad_id: int, device) -> dict:
    """A micro-batch for `shared_completion_logprobs`: each distinct prompt once, left padded to the
    longest (the width P of `collate`), its images once; completions right padded to the longest
    (width C, as `collate`'s completion_ids and completion_mask); `repeats[j]`: how many consecutive
    samples use prompt j."""
    runs = prompt_runs(samples)
    heads = [samples[i] for i in np.cumsum([0] + runs[:-1])]
    m, n = len(heads), len(samples)
    P = max(len(s.prompt_ids) for s in heads)
    C = max(len(s.completion_ids) for s in samples)
    prompt_ids = torch.full((m, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((m, P), dtype=torch.long)
    prompt_mm = torch.zeros((m, P), dtype=torch.long)
    for j, s in enumerate(heads):
        p = len(s.prompt_ids)
        prompt_ids[j, P - p:], prompt_mask[j, P - p:] = s.prompt_ids, 1
        prompt_mm[j, P - p:] = s.mm_token_type_ids
    completion_ids = torch.full((n, C), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((n, C), dtype=torch.bool)
    for i, s in enumerate(samples):
        c = len(s.completion_ids)
        completion_ids[i, :c], completion_mask[i, :c] = s.completion_ids, True
    with_images = [s for s in heads if s.pixel_values is not None]
    batch = dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, prompt_mm_token_type_ids=prompt_mm,
        pixel_values=torch.cat([s.pixel_values for s in with_images]) if with_images else None,
        image_grid_thw=torch.cat([s.image_grid_thw for s in with_images]) if with_images else None,
        completion_ids=completion_ids, completion_mask=completion_mask,
        repeats=torch.tensor(runs, dtype=torch.long))
    return {k: v.to(device) if v is not None else None for k, v in batch.items()}


class _RecordingCache(DynamicCache):
    """The prompt pass's cache: records each layer's keys and values and returns them unchanged (the
    prompt attends to itself only); once frozen, a gradient-checkpointing replay is ignored."""

    def __init__(self):
        super().__init__()
        self.recorded, self.frozen = {}, False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.frozen:
            self.recorded[layer_idx] = (key_states, value_states)
        return key_states, value_states


class _PrefixCache(DynamicCache):
    """The completion pass's cache: per layer the prompt's keys and values (already repeated per
    sample) in front of the new ones. It stores nothing, so a replay computes the same thing."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.prefix = prefix

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.prefix[layer_idx]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix[0][0].shape[-2]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


@contextlib.contextmanager
def _cache_through_checkpointing(module):
    """Let the decoder layers keep `past_key_values` under gradient checkpointing.

    transformers' GradientCheckpointingLayer drops the cache in training mode (a recomputation would
    write a cache twice), which would silently cut the completions off their prompt. Both caches
    above are replay-safe, so the layers are marked `_can_checkpoint_with_cache` (transformers' own
    switch for such caches) while the passes run. Needs non-reentrant checkpointing (`load_models`):
    the prompt's keys reach the completion layers outside their arguments.
    """
    layers = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(type(m), "_can_checkpoint_with_cache")]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # the class's default again


def _unshard_before_backward(core, recorded: dict) -> None:
    """FSDP2: gather a decoder layer's weights when the gradient reaches its prompt keys and values.

    FSDP2 gathers a layer for its backward when the gradient reaches the layer's output; the prompt's
    keys and values leave the layer through the cache, so their gradient can come first, and the
    layer's backward (its recomputation under checkpointing) would meet sharded weights ("aten.mul.Tensor
    got mixed torch.Tensor and DTensor", measured on 2 gloo processes). A hook on them gathers the
    layer first (`unshard` does nothing when it is gathered); FSDP2 reshards it after its backward as
    usual. FSDP v1 units have no `unshard`, and passed without it on CPU.
    """
    layers = core.model.language_model.layers
    for layer_idx, (keys, values) in recorded.items():
        layer = layers[layer_idx]
        if hasattr(layer, "unshard") and keys.requires_grad:
            for tensor in (keys, values):
                tensor.register_hook(lambda grad, layer=layer: (layer.unshard(), grad)[1])


def prompt_positions(core, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions of the prompts [3, m, P] and of each prompt's first completion token [m], as
    the plain forward gets them from the model: with an image in the micro-batch, Qwen2.5-VL's
    `get_rope_index` (the text after the image continues at the rope delta); without, the column
    index."""
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    m, P = ids.shape
    if batch["image_grid_thw"] is not None:
        positions, deltas = core.model.get_rope_index(
            ids, mm_token_type_ids=batch["prompt_mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
            attention_mask=mask)
        return positions, mask.sum(-1) + deltas.view(-1)
    columns = torch.arange(P, device=ids.device).view(1, 1, P).expand(3, m, P)
    return columns, torch.full((m,), P, device=ids.device)


def shared_completion_logprobs(model, batch: dict, temperature: float, never_ids: list[int],
                               with_entropy: bool = False, chunk_tokens: int = 0):
    """`completion_logprobs` for a `collate_shared` micro-batch, each prompt computed once: logp [n, C]
    (and the entropy, without gradient), equal to the plain path's up to rounding, with and without
    gradient (the section's comment has the argument).

    Under DDP the prompt pass runs on the unwrapped module and only the completion pass through the
    wrapper: DDP sees one forward per backward, and the completion pass's graph reaches every weight
    the prompt pass used (through its keys and values), which is what find_unused_parameters walks.
    Under FSDP both run through the model (the root unit gathers its own weights in its forward).
    accelerate's autocast wraps the unwrapped module's forward, so both passes compute alike.
    """
    core, repeats = getattr(model, "module", model), batch["repeats"]
    n, C = batch["completion_ids"].shape

    def per_sample(t, dim=0):  # prompt rows -> sample rows; the adjoint sums the copies
        return t.repeat_interleave(repeats, dim=dim, output_size=n)

    positions, start = prompt_positions(core, batch)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    with _cache_through_checkpointing(core):
        # The prompt pass: every prompt once, image included, over all but its last token. Its one
        # logit row is thrown away; calling the inner model instead would skip accelerate's autocast.
        recorder = _RecordingCache()
        (core if ddp else model)(
            input_ids=batch["prompt_ids"][:, :-1], attention_mask=batch["prompt_mask"][:, :-1],
            mm_token_type_ids=batch["prompt_mm_token_type_ids"][:, :-1], position_ids=positions[..., :-1],
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            past_key_values=recorder, use_cache=False, logits_to_keep=1)
        recorder.frozen = True
        if len(recorder.recorded) != core.config.get_text_config().num_hidden_layers:
            raise RuntimeError(f"the prompt pass recorded the keys and values of {len(recorder.recorded)} "
                               "layers, not all: a layer dropped past_key_values (gradient checkpointing "
                               "without _cache_through_checkpointing?)")
        if torch.is_grad_enabled():
            _unshard_before_backward(core, recorder.recorded)
        prefix = [(per_sample(k), per_sample(v)) for _, (k, v) in sorted(recorder.recorded.items())]
        # The completion pass: [q_last, o_0 .. o_{C-1}] per sample against its prompt's keys and
        # values; output t predicts o_t (the last output predicts nothing, as in the plain path).
        input_ids = torch.cat([per_sample(batch["prompt_ids"][:, -1:]), batch["completion_ids"]], 1)
        attention_mask = torch.cat([per_sample(batch["prompt_mask"]), batch["completion_mask"].long()], 1)
        steps = torch.arange(C, device=start.device)
        completion_positions = torch.cat([positions[..., -1:],
                                          (start[:, None] + steps).unsqueeze(0).expand(3, -1, -1)], -1)
        with logprob_head(model, batch["completion_ids"], temperature, never_ids, chunk_tokens, with_entropy):
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        mm_token_type_ids=torch.zeros_like(input_ids),  # completion tokens are text
                        position_ids=per_sample(completion_positions, dim=1),
                        past_key_values=_PrefixCache(prefix), use_cache=False, logits_to_keep=C + 1)
    logp, entropy = out.logits.unbind(-1)
    return (logp, entropy) if with_entropy else logp


# ---------------------------------------------------------------------------------------------
# Rollouts with vLLM (--engine vllm; optional: `make install-vllm`, docs/vllm.md)
# (a reader of the algorithm may skip this: the reference engine is HF generate, in `rollout`)
# ---------------------------------------------------------------------------------------------


class VLLMRollouts:
    """Step 2 and validation's greedy answers from a vLLM engine in this process, beside the policy
    (colocated, as TRL's colocate mode and verl's hybrid engine): `rollout` hands its work here.

    The same as the HF path: the prompts (reward.chat_prompts, one `<|image_pad|>` per image, which
    vLLM expands; image and text-only rows in one call), the sampling settings (evaluate.vllm_sampling
    translates the same reward.generation_kwargs dict: temperature, top_p, no top_k, no repetition
    penalty, max_new_tokens, and the suppressed ids as their complement, allowed_token_ids), the stop
    at the first end-of-turn (the policy's generation_config eos ids), what comes back (each
    completion's ids up to and including that token, and whether it was truncated), and everything
    downstream: logp_old, logp_ref and the update come from the policy's own forward passes, as in
    verl; vLLM's log-probs are never used (after a sync they equal the policy's, within 2.5e-5 in
    fp32 on the toy, tests/test_vllm.py).

    Differs:
    - vLLM holds its own copy of the weights. After every update the copy is marked stale, and the
      next rollout (a training step's or validation's) first pushes the policy's weights into it
      (`sync`): `collective_rpc("reload_weights", ...)`, the path that works on vLLM's CPU backend as
      on GPUs (TRL's `model_runner.model.load_weights` fails on the CPU backend's repacked linear
      weights), then the encoder cache (image features of the old weights; without this reset the
      next image request fails) and the prefix cache are emptied. A resumed run pushes its
      checkpoint's weights before its first rollout.
    - Seeds: vLLM draws each request from its own generator, so each prompt is seeded, from
      reward.sampling_seed(--seed, step, its position in the step), and its G samples from s, s + 1,
      ... (the HF path seeds each generate call). A resumed run samples the same completions; the
      two engines draw different ones from the same distribution.
    - Batching: the B prompts go to one llm.generate call and vLLM schedules them (continuous
      batching, paged KV cache); --generation_batch_size, --eval_batch_size and --share_prompt's
      shared prefill do not apply (a request's G samples share one prefill in vLLM by itself).
    - One process only (Args.check refuses more): one engine, no data parallelism yet.
    - dtype: bfloat16 with --mixed_precision bf16 (the policy's compute dtype), float32 otherwise.
    - Sleep mode (GPUs, --vllm_sleep): between rollouts vLLM sleeps at level 2, its copy of the
      weights and its KV cache freed for the log-prob passes and the update (as TRL's colocate mode
      does); the next rollout allocates the weights, pushes the policy's (the copy was dropped, so
      every rollout syncs), then allocates the KV cache and samples. Written from vLLM's API and
      checked on a CPU against a stand-in engine (the order of the calls, tests/test_vllm.py); not
      yet run on a GPU.
    """

    def __init__(self, args: Args, accelerator, dataset, eval_rows: list[dict]):
        import pyarrow.compute
        cuda = accelerator.device.type == "cuda"
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else vLLM cuts it to 1
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache
        import vllm  # Args.check has checked that it is installed
        self.sleeps = cuda and args.vllm_sleep
        images = [1] + [len(row.get("images") or []) for row in eval_rows]  # vLLM's per-prompt limit
        if "images" in dataset.column_names:
            counts = pyarrow.compute.list_value_length(dataset.with_format("arrow")["images"])
            images.append(pyarrow.compute.max(counts).as_py() or 0)
        max_len = args.max_prompt_length + args.max_new_tokens  # longer prompts were skipped
        # Chunked prefill off and a token budget of at least a whole sequence: no prompt is split over
        # engine steps (on CPU, a seeded request split so fails: "CPU Generator does not use offset").
        # processed_logprobs: log-probs, when asked (the tests), after the temperature and the mask.
        self.llm = vllm.LLM(
            model=args.model, dtype="bfloat16" if accelerator.mixed_precision == "bf16" else "float32",
            seed=args.seed, max_model_len=max_len, enable_chunked_prefill=False,
            max_num_batched_tokens=max(max_len, 8192), enforce_eager=not cuda,
            gpu_memory_utilization=args.vllm_memory, limit_mm_per_prompt={"image": max(images), "video": 0},
            logprobs_mode="processed_logprobs", enable_sleep_mode=self.sleeps)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.stale = True  # vLLM loaded --model; the policy may be a resumed checkpoint's
        self.asleep = False
        self.sync_seconds: list[float] = []

    def sync(self, model) -> None:
        """Push the policy's weights (unwrapped, fp32 master copy; vLLM casts to its dtype) into vLLM."""
        start = reward.synced_time(torch.device("cpu"))
        weights = ((name, tensor.detach()) for name, tensor in model.state_dict().items())
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        self.stale = False
        self.sync_seconds.append(reward.synced_time(torch.device("cpu")) - start)

    def close(self) -> None:
        """Shut the engine down (its process group with it) before accelerate ends the run's own:
        otherwise vLLM's exit handler fails on a group accelerate has destroyed."""
        self.llm.llm_engine.engine_core.shutdown()

    def prompts(self, processor, rows: list[dict]) -> list[dict]:
        """vLLM's prompts of `rows`: the chat texts, with the images of the rows that have any (a
        text-only row carries no multi_modal_data, so one call mixes both)."""
        texts, _ = reward.chat_prompts(processor, rows)
        images = [{"multi_modal_data": {"image": row["images"]}} if row.get("images") else {} for row in rows]
        return [{"prompt": text, **image} for text, image in zip(texts, images)]

    def rollout(self, model, processor, rows: list[dict], group_size: int, gen_kwargs: dict,
                eos_ids: list[int], seed: tuple[int, int] | None) -> list[tuple[list[int], bool]]:
        """`rollout`'s answer from vLLM: row i's G completions at [i G, (i + 1) G), each (its ids up
        to and including the first end-of-turn token, truncated). seed: (run seed, step), or None
        when greedy."""
        from evaluate import vllm_sampling  # the one translation of the HF settings, as evaluate.py's
        from vllm import SamplingParams
        if self.asleep:  # level 2 dropped the weights: room for them first, then the policy's
            self.llm.wake_up(tags=["weights"])
        if self.stale:
            self.sync(model)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        params = vllm_sampling(gen_kwargs, group_size, self.vocab_size, eos_ids)
        sampling = [SamplingParams(**params, seed=None if seed is None else reward.sampling_seed(*seed, i))
                    for i in range(len(rows))]
        outputs = self.llm.generate(self.prompts(processor, rows), sampling, use_tqdm=False)
        if self.sleeps:  # the GPU memory goes to the log-prob passes and the update until the next rollout
            self.llm.sleep(level=2)
            self.asleep = self.stale = True
        completions = []
        for output in outputs:
            for sample in sorted(output.outputs, key=lambda c: c.index):
                ids = list(sample.token_ids)
                end = next((t for t, i in enumerate(ids) if i in eos_ids), None)
                completions.append((ids, True) if end is None else (ids[:end + 1], False))
        return completions


# ---------------------------------------------------------------------------------------------
# 7. Distributed: every place where processes meet (a reader of the algorithm may skip this)
# ---------------------------------------------------------------------------------------------
# On one process each is a no-op. With W processes (DDP, or FSDP with configs/fsdp.yaml):
#  - rows: the main process checks them, the others receive its verdict (`usable_prompts`);
#  - rollout: generate call k runs on process k mod W, then every process receives every completion
#    (`rollout`, gather_object); under FSDP the policy's whole parameters are gathered around
#    generate (`full_parameters`), and under FSDP v1 every process makes the same number of
#    generate calls, with synced_gpus (`rollout`);
#  - update: each process trains on its block of every mini-batch (`update_share`); the mini-batch's
#    token and sequence counts are all-reduced before any backward, each process's loss is scaled by
#    W (DDP and FSDP average gradients), and gradients are synchronised on the last micro-batch only,
#    on every one under FSDP (`accumulate_gradients`); the logged sums are all-reduced and the
#    gradient norm is global, so every process skips the same optimizer steps (`update`);
#  - shared prompt (--share_prompt): under DDP the prompt pass runs on the unwrapped module and only
#    the completion pass through the wrapper (one wrapped forward per backward); under FSDP2 a hook
#    gathers a layer when the gradient reaches its prompt keys and values, before its output's
#    (`shared_completion_logprobs`, `_unshard_before_backward`); the rollout's prefill runs inside
#    `full_parameters` like generate, on every process alike (FSDP v1's padding calls included);
#  - DDP: find_unused_parameters, since a micro-batch without images leaves the vision tower without
#    gradient (`main`); the scheduler is not prepared, or accelerate would step it once per process
#    (`load_models`);
#  - FSDP: a forward without images sends a dummy image through the vision tower, so that every
#    process issues the same all-gathers (`reward.run_vision_on_every_forward`); gradients are
#    reduced in fp32 (`reward.fsdp_mixed_precision`);
#  - logs: per-sample values and timings gathered (`step_record`), the file written by the main
#    process (`log`); validation gives every process every completion (`validate`);
#  - checkpoints: every process saves its training state and joins the gathering of the weights,
#    the main process writes the files, barriers around (`save_checkpoint`, `reward.save_model`,
#    `resume`).
# The FSDP pieces sft.py needs too (the dummy image, the fp32 reductions) are in reward.py section 5.


@contextlib.contextmanager
def full_parameters(model, accelerator):
    """Whole parameters for generate, which FSDP keeps sharded (a 1 / W share on each process).

    FSDP2 (configs/fsdp.yaml): every FSDP unit is all-gathered once, in the compute dtype (bf16 under
    mixed precision), and kept whole until the context ends: one all-gather of the policy per
    rollout, none per decoding step. The price is a whole bf16 copy of the policy per GPU during the
    rollout (2 bytes x N: 7.0 GiB for the 3B, 15.4 GiB for the 7B; docs/real_path.md); the price of
    not paying it is an all-gather of every layer at every decoding step (4096 steps a call at the
    paper's lengths: for the 3B about 177 s of transfers per step against a few milliseconds, by
    docs/real_path.md's arithmetic), and transformers' generate runs the vision tower outside the
    model's forward (before its first step), where FSDP2 would not gather it. So the copy it is.
    FSDP (v1): its public API cannot keep the units whole: summon_full_params(recurse=True) gathers
    them in fp32 and the first forward of each unit reshards it again, so decoding still gathered
    every layer at every step (measured on 2 CPU processes: 2 all-gathers per step for 2 layers,
    recurse=False or True). So v1 gathers only the root's parameters here (embeddings, output layer,
    vision patch embedding and merger) and every layer gathers its own in its forward, as TRL does;
    generate then runs with synced_gpus=True and every process makes the same number of calls
    (`rollout`), so that processes whose samples end early keep joining the all-gathers.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        yield
    elif not accelerator.is_fsdp2:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, recurse=False, writeback=False):
            yield
    else:
        from torch.distributed.fsdp import FSDPModule

        # FSDP2 takes the first unit to run forward as its root; generate runs the vision blocks
        # before the model's forward (a validation may come before any training step), so the root
        # is set up here first (torch's own lazy init; a no-op once done).
        model._get_fsdp_state()._lazy_init()
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        model.set_reshard_after_forward(False)  # every unit, the root included
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
            reshard = accelerator.state.fsdp_plugin.reshard_after_forward
            model.set_reshard_after_forward(reshard if isinstance(reshard, bool) else True)
            model.set_reshard_after_forward(False, recurse=False)  # the root's, as fully_shard sets it


# ---------------------------------------------------------------------------------------------
# 8. Plumbing: set-up, the numerical guard, checkpoints, logs (a reader of the algorithm may skip it)
# ---------------------------------------------------------------------------------------------
# Precision, writing the model files, stale .tmp folders and metrics.jsonl on resume, the same as
# sft.py's, are in reward.py section 5.


@dataclass
class Guard:
    """The numerical guard of a run (docs/method.md section 10); saved with every checkpoint.

    - An optimizer step whose loss or gradient norm is not finite is skipped (in `update`): its
      gradients are dropped and AdamW does not step, since one NaN in its moments would reach every
      weight for good. All processes decide alike: both numbers are reduced over processes first.
    - `max_skipped` skipped optimizer steps in a row stop the run, naming the step and the last
      finite metrics: a run that keeps producing them is diverging, not meeting one odd batch.
    - `collapse_steps` steps in a row where no completion has the answer format and every group's
      rewards are equal are warned about: every advantage is then 0, and nothing but the KL term
      moves the policy. Measured on the toy world at lr 1e-2: the policy went near uniform in one
      step and stayed there, reward 0 and gradient norm 0, without any error.
    """

    max_skipped: int = 3
    collapse_steps: int = 5
    skipped_in_a_row: int = 0  # optimizer steps
    collapsed_in_a_row: int = 0  # training steps
    last_finite: dict | None = None  # a few metrics of the last step whose updates all ran

    def after_step(self, record: dict) -> str | None:
        """Count a logged step: SystemExit after too many skipped optimizer steps in a row; the
        collapse warning (returned) on the step that completes `collapse_steps` collapsed ones."""
        if not record["skipped"]:
            self.last_finite = {k: record[k] for k in ("step", "reward", "loss", "grad_norm", "kl",
                                                       "entropy")}
        if 0 < self.max_skipped <= self.skipped_in_a_row:
            last = (f"last finite metrics: {json.dumps(self.last_finite)}" if self.last_finite
                    else "no step with finite metrics in this run")
            raise SystemExit(
                f"grpo.py stopped at step {record['step']}: {self.skipped_in_a_row} optimizer steps in a "
                f"row skipped for a non-finite loss or gradient norm ({record['skip_reason']}); {last}. "
                f"Lower --learning_rate, or resume from an earlier checkpoint.")
        collapsed = record["format_rate"] == 0 and record["zero_advantage_groups"] == 1
        self.collapsed_in_a_row = self.collapsed_in_a_row + 1 if collapsed else 0
        if 0 < self.collapse_steps == self.collapsed_in_a_row:
            return (f"warning: step {record['step']}: for {self.collapse_steps} steps in a row no "
                    f"completion had the answer format and every group's rewards were equal (all "
                    f"advantages 0, nothing to learn from): the policy has likely collapsed (entropy "
                    f"{record['entropy']}). Lower --learning_rate, or resume from an earlier checkpoint.")
        return None


@contextlib.contextmanager
def named_sampling_failure(step: int, model, learning_rate: float):
    """Why generate found no finite probabilities at `step` (torch.multinomial's "probability tensor
    contains inf/nan": the updates diverged): a SystemExit naming the weights the updates left,
    instead of a traceback from inside generate."""
    try:
        yield
    except RuntimeError as err:
        if "probability tensor contains" not in str(err):
            raise
        weights = [p.detach() for p in model.parameters()]
        nonfinite = sum(int((~w.isfinite()).sum()) for w in weights)
        largest = max(float(w.abs().max()) for w in weights if w.numel())
        policy = "the starting model (--model)" if step == 1 else f"the policy after step {step - 1}"
        cause = (f"{nonfinite} of its weights are not finite" if nonfinite else
                 f"its weights are finite but reach |w| = {largest:.3g}, and its activations overflow")
        raise SystemExit(
            f"grpo.py stopped at step {step}: sampling failed ({err}): {policy} gives non-finite "
            f"probabilities; {cause}. The updates diverged: lower --learning_rate (now {learning_rate:g}) "
            f"and start over, or resume from an earlier checkpoint.") from None


def fingerprint(args: Args, dataset, eval_set) -> dict:
    """What makes a run this run (reward.claim_output_dir): the stage, every setting that changes
    what it computes (all Args but NOT_SETTINGS), its data and its starting model."""
    settings = {k: v for k, v in asdict(args).items() if k not in NOT_SETTINGS}
    if args.engine == "hf":  # absent, so that folders of runs from before --engine still resume
        del settings["engine"]
    return {"stage": "grpo", "model": args.model, "settings": settings,
            "data": {"train": reward.data_fingerprint(dataset),
                     "validation": None if eval_set is None else reward.data_fingerprint(eval_set)}}


def save_checkpoint(accelerator, model, processor, args: Args, step: int, guard: Guard | None):
    """DIR/checkpoint-{step} after `step`, or DIR/final (guard None), docs/method.md section 10: the
    model and processor via save_pretrained in --save_dtype (`reward.saved_dtype`; loadable like a
    hub id);
    a checkpoint also holds training_state/ (accelerate: the fp32 weights, optimizer, scheduler,
    every process's RNG) and trainer_state.json (the step and the guard's counts): what `resume`
    reads. Everything is written into a .tmp
    folder, then renamed with os.replace: the rename is the completeness marker, so a run killed
    while saving leaves only a .tmp folder, which resuming ignores and removes. Then checkpoints
    beyond --save_total_limit go, oldest first, with transformers' rotate_checkpoints (accelerate's
    ProjectConfiguration(total_limit) rotates only its own checkpoints/checkpoint_{i} layout, not
    this one).
    """
    state = None if guard is None else {"step": step, "guard": asdict(guard)}
    folder = os.path.join(args.output_dir, "final" if state is None else f"checkpoint-{step}")
    tmp = folder + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if state is not None:
        accelerator.save_state(os.path.join(tmp, TRAINING_STATE))
    dtype = reward.saved_dtype(args.save_dtype, accelerator.mixed_precision)
    reward.save_model(accelerator, model, processor, tmp, dtype)  # full weights, gathered under FSDP
    if accelerator.is_main_process and state is not None:
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump(state, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)  # saved before by this run, resumed from an older one
        os.replace(tmp, folder)
        if state is not None:
            rotate_checkpoints(args.output_dir, args.save_total_limit)
    accelerator.wait_for_everyone()


def resume(accelerator, args: Args, metrics_path: str) -> tuple[int, Guard]:
    """Where this run continues (docs/method.md section 10): the step of the checkpoint whose
    training state is now loaded and the guard's counts at that step, or step 0 and a fresh guard.

    --resume latest takes the newest complete checkpoint (transformers' get_last_checkpoint matches
    `checkpoint-<digits>` only, never the .tmp folder of a save a kill interrupted; those are removed)
    and starts afresh when there is none, so it is always safe to pass. --resume PATH must be a
    complete checkpoint. metrics.jsonl keeps the lines up to the checkpoint's step: later ones are
    computed again, and a line torn by a kill mid-write (not JSON) is dropped.
    """
    checkpoint = None
    if args.resume == "latest":
        checkpoint = get_last_checkpoint(args.output_dir)
        if checkpoint is None:
            accelerator.print(f"--resume latest: no complete checkpoint in {args.output_dir}; the run "
                              "starts afresh")
    elif args.resume:
        if not os.path.isfile(os.path.join(args.resume, TRAINER_STATE)):
            raise ValueError(f"--resume {args.resume}: not a complete checkpoint (no {TRAINER_STATE}); "
                             "pass a checkpoint-{step} folder or 'latest'")
        checkpoint = args.resume
    state = {"step": 0}
    if checkpoint is not None:
        with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
            state = json.load(f)
        accelerator.load_state(os.path.join(checkpoint, TRAINING_STATE))
        accelerator.print(f"resumed from {checkpoint} after step {state['step']}")
    if accelerator.is_main_process:
        reward.remove_stale_tmp(args.output_dir)
        reward.keep_metrics_until(metrics_path, state["step"])
    accelerator.wait_for_everyone()  # no process logs before the file is rewritten
    guard = Guard(**{**state.get("guard", {}), "max_skipped": args.max_skipped_steps,
                     "collapse_steps": args.collapse_steps})
    return state["step"], guard


def log(accelerator, metrics_path: str, record: dict) -> None:
    """A line of metrics.jsonl (written by the main process) and the tracker's numbers (--report_to)."""
    if accelerator.is_main_process:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])


def load_data(args: Args, accelerator):
    """The processor, the usable training rows and the validation rows (`usable_prompts`), before
    any model work, and this run's folder claimed (docs/method.md section 10): another run's folder
    is refused. None when the run was resumed and is finished (final/ exists): nothing to do."""
    dataset = reward.load_split(args.data, args.split)
    eval_set = validation_slice(args) if args.eval_every > 0 else None
    final_dir = os.path.join(args.output_dir, "final")
    if accelerator.is_main_process:
        reward.claim_output_dir(args.output_dir, fingerprint(args, dataset, eval_set),
                                resume=args.resume is not None)
    accelerator.wait_for_everyone()
    if args.resume is not None and os.path.isdir(final_dir):
        accelerator.print(f"{args.output_dir}: this run is finished ({final_dir} exists); nothing to do")
        return None
    processor = AutoProcessor.from_pretrained(args.model)
    dataset, skipped = usable_prompts(dataset, args.data, args.split, processor, args, accelerator)
    eval_rows = []
    if eval_set is not None:
        eval_data = args.eval_data or args.data
        eval_set, eval_skipped = usable_prompts(eval_set, eval_data, args.eval_split, processor, args,
                                                accelerator)
        skipped += eval_skipped
        eval_rows = [reward.check_row(row, reward.data_dir(eval_data)) for row in eval_set]
    if skipped and accelerator.is_main_process:
        reward.write_bad_rows(skipped, args.output_dir)
    if len(dataset) < args.rollout_batch_size:
        raise ValueError(f"{args.data}:{args.split} has {len(dataset)} usable rows, fewer than "
                         f"--rollout_batch_size {args.rollout_batch_size}")
    return processor, dataset, eval_rows


def load_models(args: Args, accelerator, total_steps: int):
    """The policy (prepared by accelerate: DDP or FSDP), the frozen reference (None when beta is 0),
    AdamW and the learning-rate scheduler.

    The policy is trained in fp32 (bf16 compute through accelerate's mixed precision); the frozen
    reference only runs forward, in bf16 with --mixed_precision bf16. Both start from --model.
    """
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1:
        reward.run_vision_on_every_forward(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if args.beta > 0:
        ref_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        ref_model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=ref_dtype)
        ref_model = ref_model.to(accelerator.device).eval()
        ref_model.requires_grad_(False)
    # Weight decay on every parameter, as verl's actor optimizer does.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=round(args.warmup_ratio * total_steps * args.updates_per_step),
                              num_training_steps=total_steps * args.updates_per_step)
    reward.fsdp_mixed_precision(accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: accelerate would step it once per process per call. Registered so save_state keeps it.
    accelerator.register_for_checkpointing(scheduler)
    return model, ref_model, optimizer, scheduler


def special_ids(processor, model, name: str) -> tuple[int, list[int], list[int]]:
    """The pad id, the ids never generated (reward.never_generate_ids) and the end-of-turn ids, from
    the model's generation_config as generate reads them."""
    eos_ids = model.generation_config.eos_token_id
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    if any(i is None for i in eos_ids) or not eos_ids:
        raise ValueError(f"{name}: generation_config has no eos_token_id to end a completion")
    return processor.tokenizer.pad_token_id, reward.never_generate_ids(processor.tokenizer), eos_ids


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None):
    args = reward.parse_args(Args, argv)
    accelerator = Accelerator(
        mixed_precision=reward.precision(args.mixed_precision),  # bf16: autocast, on a GPU or a CPU
        log_with=reward.tracker(args.report_to), project_dir=args.output_dir,
        # A process whose micro-batch has no image leaves the vision tower without gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    args.check(accelerator.num_processes)
    data = load_data(args, accelerator)  # rows checked, run folder claimed: before any model work
    if data is None:
        return os.path.join(args.output_dir, "final")
    processor, dataset, eval_rows = data
    steps_per_epoch = len(dataset) // args.rollout_batch_size
    total_steps = args.max_steps if args.max_steps > 0 else args.num_epochs * steps_per_epoch
    model, ref_model, optimizer, scheduler = load_models(args, accelerator, total_steps)
    pad_id, never_ids, eos_ids = special_ids(processor, accelerator.unwrap_model(model), args.model)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    start_step, guard = resume(accelerator, args, metrics_path)
    # --engine vllm: the rollouts' engine (section "Rollouts with vLLM"); None: HF generate.
    engine = VLLMRollouts(args, accelerator, dataset, eval_rows) if args.engine == "vllm" else None
    accelerator.init_trackers("grpo", config={k: v for k, v in asdict(args).items() if v is not None})
    if args.eval_every > 0 and start_step == 0:
        log(accelerator, metrics_path, {"step": 0, **validate(model, accelerator, processor, eval_rows, args,
                                                               never_ids, eos_ids, engine)})

    device, base_dir, G = accelerator.device, reward.data_dir(args.data), args.group_size
    flops = step_flops(args, accelerator)
    share = update_share(args, accelerator.process_index, accelerator.num_processes)
    bar = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_main_process, desc="grpo")
    for step in range(start_step, total_steps):
        timer = Timer(device)
        # 1. The step's B prompts, the same on every process.
        rows = step_rows(dataset, step, args, base_dir)
        # 2. G completions of each, sampled on all processes; every process receives all of them.
        with named_sampling_failure(step + 1, model, args.learning_rate):
            completions = rollout(model, accelerator, processor, rows, G, args.generation_batch_size,
                                  sampling_kwargs(args, never_ids), eos_ids, seed=(args.seed, step),
                                  share_prompt=args.share_prompt, engine=engine)
        # 3. Rewards and advantages of the groups this process trains on.
        samples = build_samples(processor, [rows[i] for i in share],
                                [c for i in share for c in completions[i * G:(i + 1) * G]])
        score(samples, G, args.scale_rewards)
        timer.lap("generate")
        # 4. logp_old and logp_ref, once per rollout, without gradients.
        old_and_ref_logprobs(model, ref_model, samples, args, pad_id, never_ids, device)
        timer.lap("logprob")
        # 5. B / M optimizer steps (one whose loss or gradient norm is not finite is skipped).
        updates = update(model, accelerator, optimizer, scheduler, samples, args, pad_id, never_ids, guard)
        if engine is not None:  # the policy moved: vLLM's copy is pushed before the next rollout
            engine.stale = True
        timer.lap("update")
        # 6. The step's metrics, with the validation every --eval_every steps and at the end.
        record = step_record(accelerator, step + 1, (step + 1) / steps_per_epoch, samples, updates,
                             timer.times, scheduler.get_last_lr()[0], G, flops)
        if args.eval_every > 0 and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
            record.update(validate(model, accelerator, processor, eval_rows, args, never_ids, eos_ids,
                                   engine))
        # Plumbing: the metrics line, the numerical guard, the progress bar, checkpoints.
        log(accelerator, metrics_path, record)
        warning = guard.after_step(record)  # raises SystemExit after too many skipped steps in a row
        if warning:
            accelerator.print(warning)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl'] or 0:.4f}",
                        **({"val": f"{record['val_accuracy']:.3f}"} if "val_accuracy" in record else {}))
        if args.save_steps > 0 and (step + 1) % args.save_steps == 0 and step + 1 < total_steps:
            save_checkpoint(accelerator, model, processor, args, step + 1, guard)

    bar.close()
    if engine is not None:
        engine.close()
    # A finished run is never resumed (final/ says it is finished), so its end writes the model alone:
    # no optimizer state (for the 3B, 45 GB of fp32 weights and Adam moments, docs/real_path.md).
    if args.save_final:
        save_checkpoint(accelerator, model, processor, args, total_steps, None)
    accelerator.end_training()
    return os.path.join(args.output_dir, "final") if args.save_final else None


if __name__ == "__main__":
    main()
