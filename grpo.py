"""GRPO from scratch in plain PyTorch: the RLVR stage of MedVLThinker (arXiv 2508.02669).

The paper trains Qwen2.5-VL on multiple-choice questions with a binary, verifiable reward
(reward.py) and Group Relative Policy Optimization (GRPO). For each prompt q it samples G
completions o_1..o_G at temperature T and minimises, over the tokens t of every completion of an
optimizer step (docs/method.md section 5, equations A, R, P, K, T):

    A_i    = (r_i - mean_g r) / (std_g r + 1e-6)                               (A, advantages)
    rho_t  = exp(logp_t - logp_old_t)                                          (R, ratio)
    l_t    = max(-A_i rho_t, -A_i clip(rho_t, 1 - eps_low, 1 + eps_high)),
             capped at -A_i c when A_i < 0                                     (P, dual clip)
           + beta * k3(logp_ref_t, logp_t)                                     (K, KL to the start)
    L      = sum_t l_t / (completion tokens of the step, all micro-batches and processes)  (T)

One training step, numbered as the sections of this file:
1. take the step's B prompts (each epoch a fixed permutation of the data);
2. sample G completions for each (the rollout, one engine call);
3. score each completion with `reward.reward` and give it its advantage against its group;
4. log-probs of the sampled tokens under the sampling policy (logp_old) and under the frozen
   starting model (logp_ref), once, without gradients;
5. B / mini-batch optimizer steps on L, with gradient accumulation over micro-batches and data
   parallelism over processes;
6. log the step's metrics, and every --eval_every steps the greedy accuracy on a held-out slice.
`main`, at the end, is the loop. How the numbers are computed (HF generate or vLLM, each group's
prompt computed once or G times, log-probs in chunks, FSDP) is engine.py's business; checkpoints,
the run folder and the numerical guard are runtime.py's. Neither changes a formula above.

    python grpo.py --model M --data D --output_dir DIR
    python grpo.py configs/grpo_m23k.yaml --model M --data D     # settings from a file, flags override
    accelerate launch --config_file configs/fsdp.yaml grpo.py ... # the paper: 8 GPUs

Which prompts share a generate call, each call's sampling seed, and which prompts form each
mini-batch are functions of positions in the step's batch only, never of the number of processes,
so one process and several sample the same completions and reach the same weights (up to
floating-point summation order). Everything a run computes is kept when it stops: metrics.jsonl (a
line per step), checkpoint-{step}/ (for --resume), final/.
"""

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, get_scheduler

import engine as engines
import reward
import runtime


@dataclass
class Args:
    """The algorithm's settings; the defaults are the paper's (docs/method.md section 5). How the
    numbers are computed is in engine.EngineArgs, where they are written in runtime.RunArgs."""

    data: str = field(metadata={"help": "Schema dataset: save_to_disk folder, parquet/jsonl or hub id."})
    model: str = field(default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={
        "help": "Starting policy (hub id or save_pretrained folder); also the frozen KL reference."})
    split: str = "train"
    # Rollout (paper: 256 prompts x 8 samples per step, T 1.0, top_p 1.0, no top_k).
    rollout_batch_size: int = field(default=256, metadata={"help": "B: prompts per step, all processes."})
    group_size: int = field(default=8, metadata={"help": "G: samples per prompt (at least 2)."})
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_length: int = field(default=2048, metadata={"help": "Longer prompts are skipped, never cut."})
    max_new_tokens: int = 4096
    generation_batch_size: int = field(default=8, metadata={
        "help": "Prompts per generate call (consecutive prompts of the step; calls are dealt to processes, "
                "and each call's sampler is seeded from its position)."})
    # Update (paper: mini-batch 128 prompts, i.e. 2 optimizer steps per rollout).
    mini_batch_size: int = field(default=128, metadata={"help": "Prompts per optimizer step, all processes."})
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
    # What GRPO trained on, for reading (not a setting: it changes nothing the run computes).
    log_completions: int = field(default=0, metadata={
        "help": "N > 0: every step, N groups of the main process (prompt, image, the G completions with "
                "their rewards, advantages, lengths, format and clipped share) to completions.jsonl and "
                "the tracker (--report_to)."})

    @property
    def updates_per_step(self) -> int:
        """B / M: optimizer steps per rollout (the paper: 256 / 128 = 2)."""
        return self.rollout_batch_size // self.mini_batch_size

    def check(self, world_size: int):
        runtime.refuse_below_one(self, ("rollout_batch_size", "mini_batch_size", "generation_batch_size",
                                        "max_prompt_length", "max_new_tokens", "eval_limit"))
        runtime.refuse_bad_sampling(self.temperature, self.top_p)
        if self.temperature <= 0:
            raise ValueError("--temperature must be above 0: GRPO samples, and its log-probs divide by it")
        if self.group_size < 2:
            raise ValueError("--group_size must be at least 2: a group of one has no baseline")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError("--rollout_batch_size must be a multiple of --mini_batch_size")
        if self.mini_batch_size % world_size:
            raise ValueError(f"--mini_batch_size must be a multiple of the {world_size} processes "
                             "(each process updates on whole groups)")
        runtime.refuse_nonsense(self, ("beta", "learning_rate", "eps_low", "eps_high", "max_grad_norm",
                                       "weight_decay"))
        if self.dual_clip <= 1:
            raise ValueError(f"--dual_clip {self.dual_clip} must be above 1 (verl's clip_ratio_c; the paper: 3)")
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean"):
            raise ValueError(f"--loss_agg must be token-mean or seq-mean-token-mean, got {self.loss_agg!r}")


# ---------------------------------------------------------------------------------------------
# 1. Prompts: the step's B prompts, and which of them this process trains on
# ---------------------------------------------------------------------------------------------


def validation_slice(args: Args):
    """The validation set: a fixed random slice of --eval_limit rows (shuffled with --eval_seed: eval
    sets are ordered by benchmark), held in memory so that no index file is written into the data's
    folder."""
    eval_set = runtime.load_split(args.eval_data or args.data, args.eval_split)
    if args.eval_limit < len(eval_set):
        eval_set = eval_set.shuffle(seed=args.eval_seed, keep_in_memory=True)
        eval_set = eval_set.select(range(args.eval_limit), keep_in_memory=True)
    return eval_set


def step_rows(dataset, step: int, args: Args, base_dir: str) -> list[dict]:
    """The B prompts of a step, in the step's order, their images decoded (reward.check_row).

    Each epoch is a permutation drawn from (seed, epoch); the step number is the data position, so a
    resumed run reads exactly the prompts the uninterrupted run would (the last partial batch of an
    epoch is dropped). Every process reads the same B rows: which process generates a prompt's group
    and which one updates on it is decided by its position in this list (`update_share`).
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
# 2. Rollout: G samples per prompt (engine.Engine.rollout)
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
    reward: float = 0.0  # step 3
    advantage: float = 0.0  # step 3
    clipped: int = 0  # step 5: its tokens a clip silenced (counted with --log_completions only)
    old_logp: torch.Tensor | None = None  # [C], step 4
    ref_logp: torch.Tensor | None = None  # [C], step 4


def sampling_kwargs(args: Args, never_ids: list[int]) -> dict:
    """The rollout's generate settings, every one explicit (reward.generation_kwargs): the sampled
    distribution is the softmax(logits / T) cut by top_p that the log-prob pass computes."""
    return reward.generation_kwargs(args.temperature, args.top_p, args.max_new_tokens, never_ids)


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


# ---------------------------------------------------------------------------------------------
# 3-5. Rewards, log-probs and the update: the GRPO objective
# ---------------------------------------------------------------------------------------------


def score(samples: list[Sample], group_size: int, scale_rewards: bool) -> None:
    """Each sample's reward (`reward.reward`) and its advantage within its group (`group_advantages`);
    `samples` holds whole groups of `group_size` adjacent samples."""
    for s in samples:
        s.reward = reward.reward(s.text, s.answer_label, s.answer)
    advantages = group_advantages(torch.tensor([s.reward for s in samples]), group_size, scale_rewards)
    for s, advantage in zip(samples, advantages.tolist()):
        s.advantage = advantage


def micro_batches(samples: list[Sample], updates_per_step: int, micro: int) -> list[list[list[Sample]]]:
    """This process's samples as the update cuts them: mini-batch k (one optimizer step) is the k-th
    of `updates_per_step` equal slices, cut into consecutive micro-batches of `micro` samples (one
    forward each). The log-prob passes of step 4 use the very same micro-batches as step 5 (see
    `old_and_ref_logprobs`)."""
    n = len(samples) // updates_per_step
    minis = [samples[k * n:(k + 1) * n] for k in range(updates_per_step)]
    return [[mini[i:i + micro] for i in range(0, len(mini), micro)] for mini in minis]


@torch.no_grad()
def old_and_ref_logprobs(model, ref_model, engine, samples: list[Sample], args: Args, micro: int) -> None:
    """logp_old (the sampling policy's) and logp_ref (the frozen reference's) of every sample, once
    per rollout, without gradients. With one mini-batch per rollout there is no logp_old pass: the
    policy has not moved since sampling, and the update uses the detached current logp.

    Each pass runs on the update's own micro-batches (`micro_batches`). Where the policy still equals
    the reference (the first update of a run), logp_ref is then logp to the bit, and the KL term's
    gradient beta (1 - exp(logp_ref - logp)) is exactly 0. Batched otherwise (other padding, other
    prompt neighbours) logp_ref differs from logp by fp32 rounding (~1e-7), and in a mini-batch whose
    groups all have A = 0 that rounding would be the whole gradient: AdamW divides each entry by its
    own magnitude, turning a 1e-9 gradient into a full learning-rate step in a direction set by
    rounding (docs/method.md section 5).
    """
    model.eval()
    passes = ([("old_logp", model)] if args.updates_per_step > 1 else []) + \
             ([("ref_logp", ref_model)] if ref_model is not None else [])
    for name, scorer in passes:
        for mini in micro_batches(samples, args.updates_per_step, micro):
            for batch in mini:
                logp, _, _ = engine.logprobs(scorer, batch, args.temperature)
                for s, row in zip(batch, logp.cpu()):
                    setattr(s, name, row[:len(s.completion_ids)])


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True) -> torch.Tensor:
    """Eq. A: A_i = (r_i - mean_g r) / (std_g r + 1e-6), std unbiased; r_i - mean_g r without scaling.

    `rewards` [N] holds groups of `group_size` adjacent samples; returns [N]. A group whose rewards
    are all equal gets A = 0: it teaches nothing. `scale_rewards=False` is Dr. GRPO's variant.
    """
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-6)
    return advantages.view(-1)


def policy_loss(logp, old_logp, advantages, mask, eps_low: float, eps_high: float, dual_clip: float):
    """Eqs. R and P: per-token clipped surrogate with verl's dual clip; [N, L], zero where mask is False.

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


def kl_k3(logp, ref_logp):
    """Eq. K: per-token k3 estimate of KL(pi || pi_ref), verl's "low_var_kl":

        d = clamp(ref_logp - logp, -20, 20);   kl = clamp(exp(d) - d - 1, -10, 10)
    """
    d = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)


def micro_batch_loss(logp, old_logp, ref_logp, advantages, mask, args: Args, n_tokens, n_seqs, world: int):
    """Eq. T for one micro-batch: its share of the mini-batch's loss L, and its per-token KL.

    token-mean: W * sum_{tokens of m} l_t / N, with N the completion tokens of the mini-batch on all
    W processes. DDP averages gradients over processes, so the sum over micro-batches and processes
    is grad( sum_all l_t / N ): exact under any split. seq-mean-token-mean: W * sum_{seq i of m}
    mean_t l_it / S, S the sequences of the mini-batch on all processes.
    """
    per_token = policy_loss(logp, old_logp, advantages, mask, args.eps_low, args.eps_high, args.dual_clip)
    kl = torch.zeros_like(logp)
    if args.beta > 0:
        kl = torch.where(mask, kl_k3(logp, ref_logp), kl)
        per_token = per_token + args.beta * kl
    if args.loss_agg == "token-mean":
        return per_token.sum() * world / n_tokens, kl
    return (per_token.sum(-1) / mask.sum(-1)).sum() * world / n_seqs, kl


def update(model, accelerator, optimizer, scheduler, engine, samples: list[Sample], args: Args,
           micro: int, guard) -> dict:
    """B / M optimizer steps on L; step k trains on this process's share of mini-batch k, `micro`
    samples per forward. Returns the logs' sums over the applied steps (`mini_batch_stats`), their
    gradient norms and why any step was skipped (the guard skips a non-finite one)."""
    model.train()
    device, world = accelerator.device, accelerator.num_processes
    done = {"sums": 0, "grad_norms": [], "skips": []}
    for k, mini in enumerate(micro_batches(samples, args.updates_per_step, micro)):
        counts = torch.tensor([sum(len(s.completion_ids) for b in mini for s in b), sum(map(len, mini))],
                              dtype=torch.float, device=device)
        n_tokens, n_seqs = accelerator.reduce(counts, "sum")  # before any backward
        totals = torch.zeros(len(STATS), device=device)
        for m, batch in enumerate(mini):
            with sync_on_last(model, accelerator, last=m == len(mini) - 1):
                logp, entropy, mask = engine.logprobs(model, batch, args.temperature, with_entropy=True)
                advantages = torch.tensor([s.advantage for s in batch], device=device)
                old_logp = logp.detach() if args.updates_per_step == 1 else pad_rows(
                    [s.old_logp for s in batch], mask, device)
                ref_logp = pad_rows([s.ref_logp for s in batch], mask, device) if args.beta > 0 else None
                loss, kl = micro_batch_loss(logp, old_logp, ref_logp, advantages, mask, args, n_tokens,
                                            n_seqs, world)
                accelerator.backward(loss)
            totals += mini_batch_stats(loss, kl, logp.detach(), old_logp, advantages, entropy, mask, args, world)
            if args.log_completions:
                clipped = clipped_tokens(logp.detach(), old_logp, advantages, mask, args.eps_low, args.eps_high,
                                         args.dual_clip)
                for s, n in zip(batch, sum(v.int() for v in clipped.values()).sum(1).tolist()):
                    s.clipped = n
        stats = dict(zip(STATS, accelerator.reduce(totals, "sum")))
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if guard.optimizer_step(optimizer, scheduler, stats["loss"], grad_norm):
            done["sums"] = done["sums"] + torch.stack([stats[name] for name in STATS])
            done["grad_norms"].append(float(grad_norm))
        else:
            done["skips"].append(f"update {k + 1} of {args.updates_per_step}: loss {float(stats['loss']):.4g}, "
                                 f"grad_norm {float(grad_norm):.4g}")
    return done


# ---------------------------------------------------------------------------------------------
# 6. Logs and validation
# ---------------------------------------------------------------------------------------------

# What each micro-batch adds to the logs, summed over a mini-batch on every process: the loss, the
# k3 KL, the tokens each clip silenced, the entropy, the tokens.
STATS = ("loss", "kl", "clip_low", "clip_high", "clip_dual", "entropy", "tokens")


def pad_rows(rows: list[torch.Tensor], mask: torch.Tensor, device) -> torch.Tensor:
    """Per-sample 1-D tensors right-padded (with 0, masked out anyway) to the micro-batch's [n, C]."""
    out = torch.zeros(mask.shape, device=device)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row.to(device)
    return out


def sync_on_last(model, accelerator, last: bool):
    """Gradients all-reduced on a mini-batch's last micro-batch only. FSDP must reduce-scatter every
    time (not syncing would keep full unsharded gradients), so it always syncs."""
    if last or runtime.is_fsdp(accelerator):
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def clipped_tokens(logp, old_logp, advantages, mask, eps_low: float, eps_high: float, dual_clip: float):
    """Which tokens each clip of `policy_loss` silenced (their gradient is zero), for the logs.

    clip_low: A < 0 and rho < 1 - eps_low; clip_high: A > 0 and rho > 1 + eps_high;
    dual: A < 0 and rho > c (then -A rho > -A c and the cap holds).
    """
    A = advantages.unsqueeze(-1)
    rho = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    return {"clip_low": (A < 0) & (rho < 1 - eps_low) & mask,
            "clip_high": (A > 0) & (rho > 1 + eps_high) & mask,
            "clip_dual": (A < 0) & (rho > dual_clip) & mask}


def mini_batch_stats(loss, kl, logp, old_logp, advantages, entropy, mask, args: Args, world: int):
    """A micro-batch's STATS (fp32 sums over its tokens; its loss as its share of L)."""
    clipped = clipped_tokens(logp, old_logp, advantages, mask, args.eps_low, args.eps_high, args.dual_clip)
    stats = dict(loss=loss.detach() / world, kl=kl.detach().sum(), **{k: v.sum() for k, v in clipped.items()},
                 entropy=(entropy.detach() * mask).sum(), tokens=mask.sum())
    return torch.stack([stats[name] for name in STATS]).float()


def step_record(accelerator, step: int, epoch: float, samples: list[Sample], updates: dict, times: dict,
                lr: float, args: Args, flops) -> dict:
    """A step's line of metrics.jsonl (docs/method.md section 5 lists every field): the rollout's
    statistics over every process's samples, the update's per token of its applied optimizer steps
    (None when every one was skipped), and the slowest process's time per phase, peak memory and
    model FLOPs utilisation."""
    device, G = accelerator.device, args.group_size
    per_sample = accelerator.gather(torch.tensor(
        [[s.reward, float(reward.is_correct(reward.extract_answer(s.text), s.answer_label, s.answer)),
          float(reward.format_ok(s.text)), len(s.completion_ids), float(s.truncated), len(s.prompt_ids)]
         for s in samples], device=device)).cpu()
    rewards, correct, formatted, lengths, truncated, prompt_lengths = per_sample.unbind(1)
    phases = ("generate", "score", "logprob", "update")
    slowest = accelerator.gather(torch.tensor([[times[p] for p in phases] + [runtime.peak_memory_gb(device)]],
                                              device=device)).max(0).values.tolist()
    seconds = sum(slowest[:len(phases)])
    applied = len(updates["grad_norms"])
    sums = dict(zip(STATS, updates["sums"])) if applied else {}
    tokens = sums["tokens"].clamp(min=1) if applied else None

    def per_token(name):  # None when every update of the step was skipped
        return (sums[name] / tokens).item() if applied else None

    # The FLOPs the step needs: each group's prompt once per pass, every completion token once.
    needed = prompt_lengths.view(-1, G)[:, 0].sum().item() + lengths.sum().item()
    passes_without_grad = 1 + (args.updates_per_step > 1) + (args.beta > 0)
    return {
        "step": step, "epoch": epoch,
        "reward": rewards.mean().item(), "accuracy": correct.mean().item(),
        "format_rate": formatted.mean().item(),
        "zero_advantage_groups": (rewards.view(-1, G).std(dim=1) == 0).float().mean().item(),
        "loss": (sums["loss"] / applied).item() if applied else None, "kl": per_token("kl"),
        "clip_low": per_token("clip_low"), "clip_high": per_token("clip_high"),
        "clip_dual": per_token("clip_dual"), "entropy": per_token("entropy"),
        "completion_length": lengths.mean().item(), "completion_length_max": lengths.max().item(),
        "truncated": truncated.mean().item(),
        "grad_norm": float(np.mean(updates["grad_norms"])) if applied else None,
        "skipped": bool(updates["skips"]),
        **({"skip_reason": "; ".join(updates["skips"])} if updates["skips"] else {}),
        "lr": lr,
        **{f"time_{p}": t for p, t in zip(phases, slowest)},
        "tokens_per_s": (lengths + prompt_lengths).sum().item() / max(seconds, 1e-9),
        "generate_tokens_per_s": lengths.sum().item() / max(slowest[0], 1e-9),
        "mfu": flops.utilisation(passes_without_grad * needed, needed, seconds, accelerator.num_processes),
        "peak_memory_gb": slowest[-1],
    }


def logged_groups(step: int, rows: list[dict], samples: list[Sample], args: Args) -> list[dict]:
    """The first --log_completions groups of this process as completions.jsonl lines: the question,
    its images (PNG thumbnails as data URIs), the answer, and per completion its text, reward,
    advantage, length, format and share of tokens a clip silenced. A group whose rewards are all
    equal has A = 0 everywhere: it teaches nothing (`zero_advantage`)."""
    G, lines = args.group_size, []
    for i, row in enumerate(rows[:args.log_completions]):
        group = samples[i * G:(i + 1) * G]
        lines.append({
            "step": step, "question": reward.build_prompt_text(row), "answer_label": row["answer_label"],
            "images": [runtime.thumbnail(image) for image in row.get("images") or []],
            "zero_advantage": len({s.reward for s in group}) == 1,
            "completions": [{"text": s.text, "reward": s.reward, "advantage": s.advantage,
                             "length": len(s.completion_ids), "format_ok": reward.format_ok(s.text),
                             "truncated": s.truncated, "clipped": s.clipped / max(len(s.completion_ids), 1)}
                            for s in group]})
    return lines


def validate(model, engine, rows, args: Args, batch_size: int, version: int) -> dict:
    """Greedy accuracy with the evaluation rule (reward.extract_answer, docs/method.md section 4).

    The rollout gives every process every completion, so all of them compute the same numbers.
    """
    greedy = reward.generation_kwargs(0, args.top_p, args.max_new_tokens, engine.never_ids)  # temperature 0
    completions = engine.rollout(model, rows, 1, greedy, batch_size, version=version, desc="validating")
    texts = engine.processor.batch_decode([ids for ids, _ in completions], skip_special_tokens=True)
    correct = torch.tensor([float(reward.is_correct(reward.extract_answer(text), row["answer_label"],
                                                    row["answer"])) for text, row in zip(texts, rows)])
    names = [row.get("dataset_name", "") for row in rows]
    metrics = {"val_accuracy": correct.mean().item()}
    for name in sorted(set(names)):
        metrics[f"val_accuracy/{name}"] = correct[[n == name for n in names]].mean().item()
    return metrics


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def schedule(args: Args) -> str:
    """The learning-rate schedule's kind: "constant" when no step's rate depends on the run's length
    (so a finished run may be extended, runtime.extend_run)."""
    if args.lr_scheduler_type == "constant_with_warmup" and args.warmup_ratio == 0:
        return "constant"
    return args.lr_scheduler_type


def load_data(args: Args, engine_args, run: runtime.RunArgs, accelerator):
    """The processor, the usable training rows and the validation rows, before any model work, and
    this run's folder claimed (docs/method.md section 10): another run's folder is refused. None
    when the run was resumed and is finished (final/ exists): nothing to do."""
    dataset = runtime.load_split(args.data, args.split)
    eval_data = args.eval_data or args.data
    eval_set = validation_slice(args) if args.eval_every > 0 else None
    if accelerator.is_main_process:
        data = {"train": runtime.data_fingerprint(dataset),
                "validation": None if eval_set is None else runtime.data_fingerprint(eval_set)}
        runtime.claim_output_dir(run.output_dir, {"stage": "grpo", "model": args.model, "data": data,
                                                  "settings": runtime.settings(args, engine_args, run)},
                                 resume=run.resume is not None, inputs=(args.data, args.eval_data, args.model),
                                 schedule=schedule(args))
    accelerator.wait_for_everyone()
    final_dir = os.path.join(run.output_dir, "final")
    if run.resume is not None and os.path.isdir(final_dir):
        accelerator.print(f"{run.output_dir}: this run is finished ({final_dir} exists); nothing to do")
        return None
    processor = AutoProcessor.from_pretrained(args.model)
    context = engines.context_length(args.model)
    if args.max_prompt_length > context:
        raise ValueError(f"--max_prompt_length {args.max_prompt_length} is beyond {args.model}'s context "
                         f"({context} positions): pass at most {context}")
    dataset, skipped = engines.usable_prompts(dataset, args.data, args.split, processor,
                                              args.max_prompt_length, run.on_bad_row, accelerator)
    eval_rows = []
    if eval_set is not None:
        eval_set, eval_skipped = engines.usable_prompts(eval_set, eval_data, args.eval_split, processor,
                                                        args.max_prompt_length, run.on_bad_row, accelerator)
        skipped += eval_skipped
        eval_rows = [reward.check_row(row, runtime.data_dir(eval_data)) for row in eval_set]
    if skipped and accelerator.is_main_process:
        runtime.write_bad_rows(skipped, run.output_dir)
    if len(dataset) < args.rollout_batch_size:
        raise ValueError(f"{args.data}:{args.split} has {len(dataset)} usable rows, fewer than "
                         f"--rollout_batch_size {args.rollout_batch_size}")
    return processor, dataset, eval_rows


def load_models(args: Args, engine_args, accelerator, total_steps: int):
    """The policy (prepared by accelerate: DDP or FSDP), the frozen reference (None when beta is 0),
    AdamW (weight decay on every parameter, as verl's actor) and the learning-rate scheduler.

    The policy is trained in fp32 (bf16 compute through accelerate's mixed precision); the frozen
    reference only runs forward, in bf16 with --mixed_precision bf16. Both start from --model.
    """
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    if engine_args.gradient_checkpointing:  # non-reentrant: the shared prompt's keys cross layers
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if args.beta > 0:
        ref_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        ref_model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=ref_dtype)
        ref_model = ref_model.to(accelerator.device).eval()
        ref_model.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    updates = total_steps * args.updates_per_step
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=round(args.warmup_ratio * updates), num_training_steps=updates)
    model, optimizer = runtime.prepare(accelerator, model, optimizer, scheduler)
    return model, ref_model, optimizer, scheduler


def main(argv: list[str] | None = None):
    args, engine_args, run, guard_args = runtime.parse_args(
        Args, engines.EngineArgs, runtime.RunArgs, runtime.GuardArgs, argv=argv,
        defaults={"output_dir": "runs/grpo"})
    accelerator = runtime.accelerator_for(run)
    args.check(accelerator.num_processes)
    engine_args.check(accelerator)
    runtime.check_model(args.model)
    data = load_data(args, engine_args, run, accelerator)  # rows checked, folder claimed: before any model work
    if data is None:
        return os.path.join(run.output_dir, "final")
    processor, dataset, eval_rows = data
    steps_per_epoch = len(dataset) // args.rollout_batch_size
    total_steps = args.max_steps if args.max_steps > 0 else args.num_epochs * steps_per_epoch
    model, ref_model, optimizer, scheduler = load_models(args, engine_args, accelerator, total_steps)
    metrics_path = os.path.join(run.output_dir, "metrics.jsonl")
    completions_path = os.path.join(run.output_dir, "completions.jsonl")
    state = runtime.restore(accelerator, runtime.find_checkpoint(run, accelerator), run, metrics_path,
                            completions_path)
    start_step, guard = state["step"], runtime.Guard(guard_args, **state.get("guard", {}))
    engine = engines.Engine(engine_args, accelerator, processor, model, args.model, args.seed,
                            args.max_prompt_length + args.max_new_tokens,
                            engines.max_images(dataset, eval_rows))
    accelerator.init_trackers("grpo", config=runtime.settings(args, engine_args, run) | {"model": args.model})
    if args.eval_every > 0 and start_step == 0:
        runtime.log(accelerator, metrics_path, {"step": 0, **validate(
            model, engine, eval_rows, args, engine_args.eval_batch_size, version=0)})

    base_dir, G, micro = runtime.data_dir(args.data), args.group_size, engine_args.micro_batch_size
    flops = runtime.flops_of(args.model, accelerator, engine_args.peak_flops)
    share = update_share(args, accelerator.process_index, accelerator.num_processes)
    bar = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_main_process, desc="grpo")
    for step in range(start_step, total_steps):
        timer = runtime.Timer(accelerator.device)
        # 1. The step's B prompts, the same on every process.
        rows = step_rows(dataset, step, args, base_dir)
        # 2. G completions of each, sampled on all processes; every process receives all of them.
        with runtime.named_sampling_failure(step + 1, model, args.learning_rate):
            completions = engine.rollout(model, rows, G, sampling_kwargs(args, engine.never_ids),
                                         args.generation_batch_size, seed=(args.seed, step), version=step)
        timer.lap("generate")
        # 3. Rewards and advantages of the groups this process trains on.
        samples = build_samples(processor, [rows[i] for i in share],
                                [c for i in share for c in completions[i * G:(i + 1) * G]])
        score(samples, G, args.scale_rewards)
        timer.lap("score")
        # 4. logp_old and logp_ref, once per rollout, without gradients.
        old_and_ref_logprobs(model, ref_model, engine, samples, args, micro)
        timer.lap("logprob")
        # 5. B / M optimizer steps.
        updates = update(model, accelerator, optimizer, scheduler, engine, samples, args, micro, guard)
        timer.lap("update")
        # 6. The step's metrics, with the validation every --eval_every steps and at the end.
        record = step_record(accelerator, step + 1, (step + 1) / steps_per_epoch, samples, updates,
                             timer.times, scheduler.get_last_lr()[0], args, flops)
        if args.eval_every > 0 and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
            record.update(validate(model, engine, eval_rows, args, engine_args.eval_batch_size, step + 1))
        runtime.log(accelerator, metrics_path, record)
        if args.log_completions:
            runtime.log_groups(accelerator, completions_path, step + 1,
                               logged_groups(step + 1, [rows[i] for i in share], samples, args))
        warning = guard.after_step(record)  # raises SystemExit after too many skipped steps in a row
        if warning:
            accelerator.print(warning)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl'] or 0:.4f}",
                        **({"val": f"{record['val_accuracy']:.3f}"} if "val_accuracy" in record else {}))
        saved = None
        if run.save_steps > 0 and (step + 1) % run.save_steps == 0 and step + 1 < total_steps:
            saved = runtime.save_checkpoint(accelerator, model, processor, run, step + 1, {"guard": guard.state()})
        stop = runtime.stop_requested(accelerator)  # SIGTERM: the step is done; save it and exit
        if stop and step + 1 < total_steps:
            saved = saved or runtime.save_checkpoint(accelerator, model, processor, run, step + 1,
                                                     {"guard": guard.state()})
            engine.close()
            raise runtime.stopped(accelerator, stop, step + 1, saved)
    bar.close()
    # A finished run resumes only to be extended, from its newest checkpoint, so its end writes the
    # model alone: no optimizer state (for the 3B, 45 GB of fp32 weights and Adam moments).
    card = {"stage": "grpo", "base_model": args.model, "datasets": [args.data]}
    final = runtime.save_checkpoint(accelerator, model, processor, run, total_steps, None, card) if run.save_final else None
    engine.close()  # after the last collective: vLLM's shutdown takes the process group with it
    if accelerator.is_main_process and run.save_final:
        accelerator.print(f"report: {runtime.write_report(run.output_dir)}")
    accelerator.end_training()
    runtime.release_output_dir(run.output_dir)
    runtime.push_final(run, final, accelerator)
    return final


if __name__ == "__main__":
    runtime.run_main(main)
