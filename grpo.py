"""GRPO from scratch in plain PyTorch: the RLVR stage of MedVLThinker (arXiv 2508.02669).

The paper trains Qwen2.5-VL on multiple-choice questions with a binary, verifiable reward
(reward.py) and Group Relative Policy Optimization (GRPO). One training step, as below
(DESIGN.md section 5 has every formula; the defaults of `Arguments` are the paper's settings):

1. take B prompts; sample G completions for each at temperature T (the rollout);
2. score each completion with `reward.reward`: 1 for a well-formatted, correct answer, else 0;
3. advantage of a completion = its reward against its group: A_i = (r_i - mean) / (std + 1e-6);
4. log-probs of the sampled tokens under the sampling policy (logp_old) and under the frozen
   starting model (logp_ref), once, without gradients;
5. B / mini-batch optimizer steps, each minimising over the tokens of its mini-batch
       token-mean of  max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))  [capped at -A c when A < 0]
                      + beta * k3(logp_ref, logp),            rho = exp(logp - logp_old),
   with gradient accumulation over micro-batches and data parallelism over processes.

Run on one process (`python grpo.py --model M --data D --output_dir DIR`) or on several with
`accelerate launch --config_file configs/{single_gpu,ddp,fsdp}.yaml grpo.py ...`. Each process owns
whole groups: prompts are sharded, never the samples of one prompt. Everything a run computes is kept
when it stops: `DIR/metrics.jsonl` (a line per step), `DIR/checkpoint-{step}/` (model + processor via
save_pretrained, and the full training state for `--resume`), `DIR/final/`.

What was verified where: everything ran on CPU (fp32, one and two gloo processes, tests/test_grpo.py).
The bf16, DDP-on-GPU and FSDP paths (configs/*.yaml, `summon_full_params` around generate) follow the
libraries' documented use but were not run on a GPU when this was written. A known risk there: under
FSDP, a micro-batch without images on one process while another process has images leaves the vision
blocks' gradient reduction unmatched; DDP handles it (find_unused_parameters), FSDP is untested on it.
Text-only data (m23k) and all-image data (PMC-VQA) never mix.
"""

import contextlib
import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser, get_scheduler

import reward


@dataclass
class Arguments:
    """Defaults are the paper's settings (DESIGN.md section 5); better variants are flags, off by default."""

    data: str = field(metadata={"help": "Schema dataset: save_to_disk folder, parquet/jsonl or hub id."})
    model: str = field(default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={
        "help": "Starting policy (hub id or save_pretrained folder); also the frozen KL reference."})
    split: str = "train"
    output_dir: str = "runs/grpo"
    # Rollout (paper: 256 prompts x 8 samples per step, T 1.0, top_p 1.0, no top_k).
    rollout_batch_size: int = field(default=256, metadata={"help": "B: prompts per step, all processes."})
    group_size: int = field(default=8, metadata={"help": "G: samples per prompt (at least 2)."})
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_length: int = field(default=2048, metadata={"help": "Longer prompts are skipped, never cut."})
    max_new_tokens: int = 4096
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    # Update (paper: mini-batch 128 prompts, i.e. 2 optimizer steps per rollout).
    mini_batch_size: int = field(default=128, metadata={"help": "Prompts per optimizer step, all processes."})
    micro_batch_size: int = field(default=8, metadata={"help": "Sequences per forward (per process)."})
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
    epochs: int = 5
    max_steps: int = field(default=-1, metadata={"help": "> 0: this many steps, not epochs."})
    seed: int = 42
    # Validation: greedy accuracy on a held-out slice (the paper used 400 items of the eval set).
    eval_every: int = field(default=0, metadata={"help": "Validate every N steps, first and last; 0: never."})
    eval_data: str | None = field(default=None, metadata={"help": "Default: --data."})
    eval_split: str = "validation"
    eval_limit: int = 400
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per greedy call (per process)."})
    # Checkpoints and logs.
    save_steps: int = 50
    resume: str | None = field(default=None, metadata={"help": "A checkpoint-{step} folder, or 'latest'."})
    report_to: str = field(default="none", metadata={"help": "none, tensorboard or wandb."})

    def check(self, world_size: int):
        if self.group_size < 2:
            raise ValueError("--group_size must be at least 2: a group of one has no baseline")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError("--rollout_batch_size must be a multiple of --mini_batch_size")
        if self.mini_batch_size % world_size:
            raise ValueError(f"--mini_batch_size must be a multiple of the {world_size} processes "
                             "(each process owns whole groups)")
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean"):
            raise ValueError(f"--loss_agg must be token-mean or seq-mean-token-mean, got {self.loss_agg!r}")


# ---------------------------------------------------------------------------------------------
# 1. Prompts
# ---------------------------------------------------------------------------------------------


def prompt_problem(row, processor, max_prompt_length: int) -> str:
    """Why a row cannot be a training prompt ("" when it can), naming the row.

    The length counts image tokens without running the image processor: the chat template holds one
    <|image_pad|> per image, which the processor expands to patches / merge^2 tokens.
    """
    try:
        text = processor.apply_chat_template(reward.build_messages(row), add_generation_prompt=True,
                                             tokenize=False)
        reward.parse_options(row)
        if not isinstance(row.get("answer"), str):
            raise reward.RowError(f"{reward.row_name(row)}: answer must be the text of the correct option")
    except reward.RowError as err:
        return str(err)
    n_tokens = len(processor.tokenizer(text)["input_ids"])
    merge = processor.image_processor.merge_size
    for image in row.get("images") or []:
        patches = processor.image_processor.get_number_of_image_patches(image.height, image.width)
        n_tokens += patches // merge**2 - 1
    if n_tokens > max_prompt_length:
        return f"{reward.row_name(row)}: prompt of {n_tokens} tokens > max_prompt_length {max_prompt_length}"
    return ""


def load_prompts(data: str, split: str, processor, max_prompt_length: int, print_fn=print,
                 limit: int | None = None):
    """The split, without the rows that cannot be prompts (reported with a count, never truncated).

    `limit` keeps a fixed random slice (seed 42) first: the eval set is ordered by benchmark.
    """
    dataset = reward.load_split(data, split)
    if limit is not None and limit < len(dataset):
        dataset = dataset.shuffle(seed=42).select(range(limit))
    problems = [prompt_problem(row, processor, max_prompt_length) for row in dataset]
    bad = [p for p in problems if p]
    if bad:
        too_long = sum("max_prompt_length" in p for p in bad)
        print_fn(f"{data}:{split}: skipped {len(bad)} of {len(dataset)} rows ({too_long} too long, "
                 f"{len(bad) - too_long} not valid prompts); first: {bad[0]}")
    if len(bad) == len(dataset):
        raise ValueError(f"{data}:{split}: no usable row")
    return dataset.select([i for i, p in enumerate(problems) if not p]) if bad else dataset


def step_rows(dataset, step: int, args: Arguments, rank: int, world_size: int) -> tuple[list[dict], int]:
    """This process's prompts of a step and the position of the first one in the global batch.

    Each epoch is a permutation drawn from (seed, epoch); the step number is the data position, so a
    resumed run reads exactly the prompts the uninterrupted run would (the last partial batch of an
    epoch is dropped). Each process takes a contiguous block of B / world prompts: whole groups.
    """
    steps_per_epoch = len(dataset) // args.rollout_batch_size
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + epoch))
    batch = order[k * args.rollout_batch_size:(k + 1) * args.rollout_batch_size]
    per_process = args.rollout_batch_size // world_size
    first = rank * per_process
    return [dataset[int(i)] for i in batch[first:first + per_process]], first


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
    dataset_name: str = ""
    text: str = ""
    reward: float = 0.0
    advantage: float = 0.0
    old_logp: torch.Tensor | None = None  # [C]
    ref_logp: torch.Tensor | None = None  # [C]


def sampling_kwargs(args: Arguments, never_ids: list[int]) -> dict:
    """Every sampling setting explicit (DESIGN.md section 9): otherwise generate uses top_k=50 and
    the checkpoint's own defaults (Qwen ships near-greedy ones and a repetition penalty), and the
    sampled distribution is no longer the softmax(logits / T) that the log-prob pass computes."""
    return dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=args.top_p, min_p=None,
                repetition_penalty=1.0, max_new_tokens=args.max_new_tokens, suppress_tokens=never_ids)


def greedy_kwargs(args: Arguments, never_ids: list[int]) -> dict:
    return dict(do_sample=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=args.max_new_tokens,
                suppress_tokens=never_ids, temperature=None, top_k=None, top_p=None)


def sampling_seed(seed: int, step: int, prompt_position: int) -> int:
    """The sampler's seed for one generate call, a function of where its prompts sit in the run.

    Samples then depend neither on the number of processes nor on what ran before (an addition to
    the paper: a resumed run and a run on another number of processes sample the same completions).
    """
    return int(np.random.SeedSequence([seed, step, prompt_position]).generate_state(1)[0])


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True up to and including the first end-of-turn token of each row, after it False.

    By position, never from the pad id: the pad id may be an end token too (DESIGN.md section 9).
    A row without an end token (truncated) is all True.
    """
    is_end = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    ends_before = is_end.long().cumsum(-1) - is_end.long()  # end tokens strictly before t
    return ends_before == 0


def split_samples(inputs, sequences: torch.Tensor, n_images: list[int], eos_ids: list[int]) -> list[Sample]:
    """Cut generate's output into Samples: unpadded prompt, its images, completion up to its end."""
    prompt_len = inputs["input_ids"].shape[1]
    completions = sequences[:, prompt_len:].cpu()
    mask = completion_mask(completions, eos_ids)
    attention = inputs["attention_mask"].bool().cpu()
    grids = inputs.get("image_grid_thw")
    pixels = inputs.get("pixel_values")
    if grids is not None:
        pixels = list(pixels.cpu().split(grids.prod(-1).tolist()))
        grids = list(grids.cpu())
    samples, image = [], 0
    for i in range(len(sequences)):
        k = n_images[i]
        samples.append(Sample(
            prompt_ids=inputs["input_ids"][i].cpu()[attention[i]],
            mm_token_type_ids=inputs["mm_token_type_ids"][i].cpu()[attention[i]],
            pixel_values=torch.cat(pixels[image:image + k]) if k else None,
            image_grid_thw=torch.stack(grids[image:image + k]) if k else None,
            completion_ids=completions[i][mask[i]],
            truncated=not torch.isin(completions[i], torch.tensor(eos_ids)).any().item(),
        ))
        image += k
    return samples


def full_parameters(model, accelerator):
    """FSDP keeps a shard of every parameter per process; generate needs them whole.

    With FSDP (v1) the root's own parameters are gathered here and every wrapped layer gathers its
    own in its forward, as TRL does; generate must then run with synced_gpus=True so that processes
    whose samples end early keep joining the all-gathers. Not run on GPUs when this was written.
    """
    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(model, recurse=False, writeback=False)
    return contextlib.nullcontext()


@torch.no_grad()
def rollout(model, accelerator, processor, rows: list[dict], group_size: int, batch_size: int,
            gen_kwargs: dict, eos_ids: list[int], seed: tuple[int, int, int] | None = None) -> list[Sample]:
    """G completions per prompt, a group's samples adjacent (DESIGN.md section 5).

    Prompts and their images are repeated G times before the processor call, so every later pass
    sees one plain sequence per sample (num_return_sequences would expand pixel_values only inside
    generate). One generate call per `batch_size` prompts, left padding.
    `seed` = (run seed, step, position of rows[0] in the global batch) seeds each call; None: greedy.
    """
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()  # gradient checkpointing is off in eval mode, so generate keeps its KV cache
    sync = accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    samples = []
    for start in range(0, len(rows), batch_size):
        chunk = [row for row in rows[start:start + batch_size] for _ in range(group_size)]
        texts, images = reward.chat_prompts(processor, chunk)
        inputs = processor(text=texts, images=images or None, padding=True, padding_side="left",
                           return_tensors="pt").to(accelerator.device)
        with torch.random.fork_rng(devices=cuda), full_parameters(model, accelerator):
            if seed is not None:
                torch.manual_seed(sampling_seed(seed[0], seed[1], seed[2] + start))
            sequences = unwrapped.generate(**inputs, **gen_kwargs, synced_gpus=sync)
        new = split_samples(inputs, sequences, [len(row.get("images") or []) for row in chunk], eos_ids)
        for sample, row in zip(new, chunk):
            sample.answer_label, sample.answer = row["answer_label"], row["answer"]
            sample.dataset_name = row.get("dataset_name", "")
        samples += new
    texts = processor.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
    for sample, text in zip(samples, texts):
        sample.text = text
    unwrapped.train(was_training)
    return samples


# ---------------------------------------------------------------------------------------------
# 3. Log-probs of the sampled tokens
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
        # A micro-batch without images sends no pixel_values at all (DESIGN.md section 9).
        pixel_values=torch.cat([s.pixel_values for s in with_images]) if with_images else None,
        image_grid_thw=torch.cat([s.image_grid_thw for s in with_images]) if with_images else None,
    )
    batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
    batch["completion_ids"] = batch["input_ids"][:, P:]
    batch["completion_mask"] = batch["attention_mask"][:, P:].bool()
    return batch


def completion_logprobs(model, batch: dict, temperature: float, never_ids: list[int],
                        with_entropy: bool = False):
    """log pi(o_t | q, o_<t) for the completion positions only: log_softmax(logits / T)[o_t].

    DESIGN.md section 5: the logits are divided by the sampling temperature T, and the ids the
    sampler suppresses are set to -inf, so these are the log-probs of the distribution sampled from.
    Only the C + 1 last hidden states reach the vocabulary projection (`logits_to_keep`): no
    [batch, prompt + completion, vocab] logits ever exist. Returns logp [n, C] (and, when asked, the
    entropy of each position's distribution, without gradient, for the logs).
    """
    C = batch["completion_ids"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                mm_token_type_ids=batch["mm_token_type_ids"],
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                use_cache=False, logits_to_keep=C + 1)
    logits = out.logits[:, :-1].float() / temperature  # position t predicts token t + 1
    logits[..., never_ids] = -math.inf
    logp = logits.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = torch.special.entr(logits.softmax(-1)).sum(-1)
    return logp, entropy


@torch.no_grad()
def sequence_logprobs(model, samples: list[Sample], args: Arguments, pad_id: int, never_ids: list[int],
                      device) -> list[torch.Tensor]:
    """logp of every sample's completion, micro-batch by micro-batch, without gradients."""
    out = []
    for start in range(0, len(samples), args.micro_batch_size):
        micro = samples[start:start + args.micro_batch_size]
        batch = collate(micro, pad_id, device)
        logp = completion_logprobs(model, batch, args.temperature, never_ids).cpu()
        out += [row[:len(s.completion_ids)] for row, s in zip(logp, micro)]
    return out


# ---------------------------------------------------------------------------------------------
# 4. The GRPO objective (DESIGN.md section 5)
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
    """Per-token k3 estimate of KL(pi || pi_ref), verl's "low_var_kl" (DESIGN.md section 5):

        d = clamp(ref_logp - logp, -20, 20);   kl = clamp(exp(d) - d - 1, -10, 10)
    """
    d = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)


def accumulate_gradients(model, accelerator, samples: list[Sample], args: Arguments, pad_id: int,
                         never_ids: list[int], on_policy: bool) -> torch.Tensor:
    """Backward of one mini-batch's loss, micro-batch by micro-batch; returns summed statistics.

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
    stats = torch.zeros(7, device=device)  # loss, kl, clip low/high/dual, entropy, tokens
    size = args.micro_batch_size
    micro_batches = [samples[i:i + size] for i in range(0, len(samples), size)]
    for k, micro in enumerate(micro_batches):
        batch = collate(micro, pad_id, device)
        mask = batch["completion_mask"]
        advantages = torch.tensor([s.advantage for s in micro], device=device)
        # Gradients are all-reduced on the last micro-batch only. FSDP must reduce-scatter every
        # time (not syncing would keep full unsharded gradients), so it always syncs.
        last = k == len(micro_batches) - 1
        no_sync = not last and accelerator.distributed_type != DistributedType.FSDP
        with accelerator.no_sync(model) if no_sync else contextlib.nullcontext():
            logp, entropy = completion_logprobs(model, batch, args.temperature, never_ids, with_entropy=True)
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
        stats += torch.stack([loss.detach() / world, kl.detach().sum(), clipped["clip_low"].sum(),
                              clipped["clip_high"].sum(), clipped["clip_dual"].sum(),
                              (entropy * mask).sum(), mask.sum()]).float()
    return stats


def pad_rows(rows: list[torch.Tensor], mask: torch.Tensor, device) -> torch.Tensor:
    """Per-sample 1-D tensors right-padded (with 0, masked out anyway) to the micro-batch's [n, C]."""
    out = torch.zeros(mask.shape, device=device)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row.to(device)
    return out


# ---------------------------------------------------------------------------------------------
# 5. Validation, logs, checkpoints
# ---------------------------------------------------------------------------------------------


def validate(model, accelerator, processor, rows, args: Arguments, never_ids, eos_ids) -> dict:
    """Greedy accuracy with the evaluation rule (reward.extract_answer, DESIGN.md section 4).

    Rows are split between processes with padding, so that every process makes the same number of
    generate calls (FSDP needs them all in every all-gather); the padding is dropped after gather.
    """
    positions = list(range(len(rows)))
    with accelerator.split_between_processes(positions, apply_padding=True) as mine:
        samples = rollout(model, accelerator, processor, [rows[i] for i in mine], 1, args.eval_batch_size,
                          greedy_kwargs(args, never_ids), eos_ids)
    correct = torch.tensor([float(reward.is_correct(reward.extract_answer(s.text), s.answer_label, s.answer))
                            for s in samples], device=accelerator.device)
    correct = accelerator.gather(correct)[:len(rows)].cpu()
    names = [row.get("dataset_name", "") for row in rows]
    metrics = {"val_accuracy": correct.mean().item()}
    for name in sorted(set(names)):
        metrics[f"val_accuracy/{name}"] = correct[[n == name for n in names]].mean().item()
    return metrics


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS, kB on Linux


def save_checkpoint(accelerator, model, processor, args: Arguments, step: int, name: str | None = None):
    """DIR/checkpoint-{step}: save_pretrained (model + processor, loadable like a hub id), and
    the full training state (accelerate: model, optimizer, scheduler, every process's RNG) for
    --resume. Written to a .tmp folder and renamed, so a run killed while saving loses nothing."""
    final = os.path.join(args.output_dir, name or f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    if name is None:
        accelerator.save_state(os.path.join(tmp, "state"))
    state_dict = accelerator.get_state_dict(model)  # full weights, gathered under FSDP
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict,
                                                        save_function=accelerator.save)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step}, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


def find_checkpoint(args: Arguments) -> str:
    if args.resume != "latest":
        return args.resume
    steps = [int(d.split("-")[1]) for d in os.listdir(args.output_dir)
             if d.startswith("checkpoint-") and d.split("-")[1].isdigit()]
    if not steps:
        raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {args.output_dir}")
    return os.path.join(args.output_dir, f"checkpoint-{max(steps)}")


def main(argv: list[str] | None = None):
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(argv)
    accelerator = Accelerator(
        log_with=None if args.report_to == "none" else args.report_to, project_dir=args.output_dir,
        # A process whose micro-batch has no image leaves the vision tower without gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    args.check(accelerator.num_processes)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    os.makedirs(args.output_dir, exist_ok=True)

    processor = AutoProcessor.from_pretrained(args.model)
    dataset = load_prompts(args.data, args.split, processor, args.max_prompt_length, accelerator.print)
    steps_per_epoch = len(dataset) // args.rollout_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{args.data}:{args.split} has {len(dataset)} usable rows, fewer than "
                         f"--rollout_batch_size {args.rollout_batch_size}")
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    eval_rows = []
    if args.eval_every > 0:
        eval_set = load_prompts(args.eval_data or args.data, args.eval_split, processor,
                                args.max_prompt_length, accelerator.print, limit=args.eval_limit)
        eval_rows = list(eval_set)

    # The policy is trained in fp32 (bf16 compute through accelerate's mixed precision); the frozen
    # reference only runs forward, in bf16 on GPUs. Both start from the same weights (--model).
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if args.beta > 0:
        ref_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        ref_model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=ref_dtype).to(device).eval()
        ref_model.requires_grad_(False)
    # Weight decay on every parameter, as verl's actor optimizer does.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    updates_per_step = args.rollout_batch_size // args.mini_batch_size
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=round(args.warmup_ratio * total_steps * updates_per_step),
                              num_training_steps=total_steps * updates_per_step)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: accelerate would step it once per process per call. Registered so save_state keeps it.
    accelerator.register_for_checkpointing(scheduler)

    pad_id = processor.tokenizer.pad_token_id
    never_ids = reward.never_generate_ids(processor.tokenizer)
    eos_ids = accelerator.unwrap_model(model).generation_config.eos_token_id
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    if any(i is None for i in eos_ids) or not eos_ids:
        raise ValueError(f"{args.model}: generation_config has no eos_token_id to end a completion")

    start_step = 0
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if args.resume:
        checkpoint = find_checkpoint(args)
        accelerator.load_state(os.path.join(checkpoint, "state"))
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            start_step = json.load(f)["step"]
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")
        if accelerator.is_main_process and os.path.exists(metrics_path):
            # Lines a stopped run wrote after its last checkpoint (or tore, killed mid-write) go:
            # those steps are run again below.
            with open(metrics_path) as f:
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= start_step]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    elif accelerator.is_main_process:
        open(metrics_path, "w").close()
    accelerator.init_trackers("grpo", config={k: v for k, v in asdict(args).items() if v is not None})

    def log(record: dict):
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log(record, step=record["step"])

    if args.eval_every > 0 and start_step == 0:
        log({"step": 0, **validate(model, accelerator, processor, eval_rows, args, never_ids, eos_ids)})

    bar = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_main_process, desc="grpo")
    for step in range(start_step, total_steps):
        clock = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # Rollout and rewards (steps 1-3 of the module docstring).
        rows, first = step_rows(dataset, step, args, rank, world)
        samples = rollout(model, accelerator, processor, rows, args.group_size, args.generation_batch_size,
                          sampling_kwargs(args, never_ids), eos_ids, seed=(args.seed, step, first))
        for s in samples:
            s.reward = reward.reward(s.text, s.answer_label, s.answer)
        advantages = group_advantages(torch.tensor([s.reward for s in samples]), args.group_size,
                                      args.scale_rewards)
        for s, advantage in zip(samples, advantages.tolist()):
            s.advantage = advantage
        time_generate = time.perf_counter() - clock

        # logp_old and logp_ref, once per rollout, without gradients (step 4).
        clock = time.perf_counter()
        on_policy = updates_per_step == 1
        model.eval()
        if not on_policy:
            for s, logp in zip(samples, sequence_logprobs(model, samples, args, pad_id, never_ids, device)):
                s.old_logp = logp
        if ref_model is not None:
            ref_logps = sequence_logprobs(ref_model, samples, args, pad_id, never_ids, device)
            for s, logp in zip(samples, ref_logps):
                s.ref_logp = logp
        time_logprob = time.perf_counter() - clock

        # The update: B / mini-batch optimizer steps over this process's whole groups (step 5).
        clock = time.perf_counter()
        model.train()
        per_update = args.mini_batch_size // world * args.group_size
        stats, grad_norms = torch.zeros(7, device=device), []
        for start in range(0, len(samples), per_update):
            stats += accumulate_gradients(model, accelerator, samples[start:start + per_update], args,
                                          pad_id, never_ids, on_policy)
            grad_norms.append(float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        time_update = time.perf_counter() - clock

        # Logs: per-sample values gathered from every process, token statistics summed.
        stats = accelerator.reduce(stats, reduction="sum")
        per_sample = accelerator.gather(torch.tensor(
            [[s.reward, float(reward.is_correct(reward.extract_answer(s.text), s.answer_label, s.answer)),
              float(reward.format_ok(s.text)), len(s.completion_ids), float(s.truncated), s.advantage]
             for s in samples], device=device)).cpu()
        group_std = per_sample[:, 0].view(-1, args.group_size).std(dim=1)
        times = accelerator.gather(torch.tensor([[time_generate, time_logprob, time_update,
                                                  peak_memory_gb(device)]], device=device)).max(0).values
        tokens = stats[6].clamp(min=1)
        record = {
            "step": step + 1, "epoch": (step + 1) / steps_per_epoch,
            "reward": per_sample[:, 0].mean().item(), "accuracy": per_sample[:, 1].mean().item(),
            "format_rate": per_sample[:, 2].mean().item(),
            "zero_advantage_groups": (group_std == 0).float().mean().item(),
            "loss": (stats[0] / updates_per_step).item(), "kl": (stats[1] / tokens).item(),
            "clip_low": (stats[2] / tokens).item(), "clip_high": (stats[3] / tokens).item(),
            "clip_dual": (stats[4] / tokens).item(), "entropy": (stats[5] / tokens).item(),
            "completion_length": per_sample[:, 3].mean().item(),
            "completion_length_max": per_sample[:, 3].max().item(),
            "truncated": per_sample[:, 4].mean().item(), "grad_norm": float(np.mean(grad_norms)),
            "lr": scheduler.get_last_lr()[0],
            "time_generate": times[0].item(), "time_logprob": times[1].item(), "time_update": times[2].item(),
            "tokens_per_s": per_sample[:, 3].sum().item() / max(times[0].item(), 1e-9),
            "peak_memory_gb": times[3].item(),
        }
        if args.eval_every > 0 and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
            record.update(validate(model, accelerator, processor, eval_rows, args, never_ids, eos_ids))
        log(record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}",
                        **({"val": f"{record['val_accuracy']:.3f}"} if "val_accuracy" in record else {}))
        if args.save_steps > 0 and (step + 1) % args.save_steps == 0 and step + 1 < total_steps:
            save_checkpoint(accelerator, model, processor, args, step + 1)

    bar.close()
    save_checkpoint(accelerator, model, processor, args, total_steps)
    save_checkpoint(accelerator, model, processor, args, total_steps, name="final")
    accelerator.end_training()
    return os.path.join(args.output_dir, "final")


if __name__ == "__main__":
    main()
