"""Supervised fine-tuning of Qwen2.5-VL on reasoning traces (MedVLThinker, arXiv 2508.02669).

The paper's first training paradigm: the model is fine-tuned to reproduce distilled reasoning traces
(R1 traces for m23k, GPT-4o traces for PMC-VQA), written as `<think> ... </think>` then
`<answer> X </answer>` (DESIGN.md section 3). In the toy world it is also the warm start that turns
the random model into an "instruct" model for RL.

    python sft.py --model Qwen/Qwen2.5-VL-3B-Instruct \
        --data UCSC-VLAA/MedVLThinker-pmc_vqa-gpt_4o_reasoning-tokenized --output_dir out/sft
    accelerate launch --multi_gpu --num_processes 8 sft.py ...   # the paper: 8 GPUs, FSDP

The story, top to bottom:
1. every row becomes one sequence: the chat prompt of `reward.build_messages` (generation prompt
   included) + the SFT target + the end-of-turn token; labels are the assistant tokens only;
2. one pass over the data measures every sequence (images expand to their real number of tokens)
   and drops, and counts, those longer than `--max_length`;
3. each optimizer step sees `--global_batch_size` sequences, split over processes and micro-batches;
   its loss is the sum of the token losses over the whole step divided by the number of label tokens
   of the whole step (every micro-batch, every process), so splitting never changes the gradient;
4. AdamW, cosine schedule with warmup, gradient clipping, checkpoints that resume exactly.

A plain PyTorch loop with accelerate, no Trainer: every number above is visible below.
"""

import json
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (AutoModelForImageTextToText, AutoProcessor, HfArgumentParser,
                          get_cosine_schedule_with_warmup)
from transformers.trainer_pt_utils import get_parameter_names

import reward

# The chat template closes every turn with this token; generation stops on it, so it is trained.
END_OF_TURN = "<|im_end|>"
IGNORE = -100  # label of a position that carries no loss (prompt, padding); F.cross_entropy's default
# Parameter names without weight decay: transformers' Trainer rule (Trainer.get_decay_parameter_names).
NO_DECAY_NAMES = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


@dataclass
class SFTArgs:
    """Defaults are the paper's SFT settings (DESIGN.md section 6) unless a comment says otherwise."""

    model: str = field(default="Qwen/Qwen2.5-VL-3B-Instruct",
                       metadata={"help": "Hub id or save_pretrained folder (model + processor)."})
    data: str = field(default="UCSC-VLAA/MedVLThinker-pmc_vqa-gpt_4o_reasoning-tokenized",
                      metadata={"help": "Schema dataset: save_to_disk folder, parquet/jsonl, hub id."})
    split: str = field(default="train", metadata={"help": "Split of --data (the toy world: sft)."})
    output_dir: str = field(default="outputs/sft", metadata={"help": "metrics.jsonl, checkpoints, final/."})
    learning_rate: float = 1e-5
    warmup_ratio: float = field(default=0.05, metadata={"help": "Linear warmup share of all steps."})
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8  # not stated in the paper: torch's and transformers' default
    max_grad_norm: float = 1.0
    global_batch_size: int = field(default=16, metadata={
        "help": "Sequences per optimizer step over all processes and micro-batches."})
    per_device_batch_size: int = field(default=2, metadata={
        "help": "Sequences per forward pass; gradient accumulation steps = global / (this x processes). "
                "2 = the paper's 16 over 8 GPUs without accumulation."})
    num_epochs: int = 5  # the released checkpoints are from epoch 3 (DESIGN.md section 6)
    max_steps: int = field(default=-1, metadata={"help": "If > 0, train this many steps, not epochs."})
    max_length: int = field(default=8192, metadata={
        "help": "Longer sequences are dropped and counted, never cut. Not stated in the paper: ours."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory, same numbers."})
    freeze_vision: bool = field(default=False, metadata={
        "help": "Freeze the vision tower and merger. Off: the paper trains everything."})
    mixed_precision: str = field(default="bf16", metadata={
        "help": "bf16 autocast on GPU (the paper); CPU runs always stay in fp32."})
    seed: int = 42
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps (0: only final/)."})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb."})
    resume: str = field(default="", metadata={
        "help": "A checkpoint-N folder, or 'latest' (the newest complete one in --output_dir)."})
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "Processes that run the processor (image resizing) ahead of the GPU."})


# ---------------------------------------------------------------------------------------------
# 1. Rows -> sequences with labels on the assistant turn only (DESIGN.md sections 3 and 6)
# ---------------------------------------------------------------------------------------------


def sft_texts(processor, rows) -> tuple[list[str], list[str], list]:
    """Prompt texts, full texts (prompt + target + end-of-turn) and the flat list of images.

    full = chat_template(user turn, generation prompt) + "<think> r </think>\\n<answer> X </answer>"
           + "<|im_end|>"
    The template writes "\\n" after every "<|im_end|>" to separate turns. Generation stops at
    "<|im_end|>", so the model never produces that newline: the sequence ends at "<|im_end|>", and
    the newline is neither an input nor a label (tests/test_sft.py checks that the text is the
    template's rendering of the whole conversation minus that newline).
    """
    for row in rows:
        if not row.get("reasoning"):
            raise reward.RowError(f"{reward.row_name(row)}: no reasoning trace to fine-tune on "
                                  f"(SFT needs the `reasoning` column; drop such rows first)")
    prompts, images = reward.chat_prompts(processor, rows)
    fulls = [prompt + reward.sft_target(row["reasoning"], row["answer_label"]) + END_OF_TURN
             for prompt, row in zip(prompts, rows)]
    return prompts, fulls, images


def tokenize(processor, rows) -> dict:
    """Token ids, attention mask, image inputs and labels for a batch of rows (right padded).

    Image placeholders expand to as many tokens as the image has patches, so prompt and full text
    both go through the processor with the images. The prompt's ids must be a prefix of the full
    ids: then the labels are the full ids with the first len(prompt) positions (and the padding)
    set to IGNORE, i.e. exactly the assistant tokens, "<|im_end|>" included. The prompt ends with
    "assistant\\n", after which Qwen's pre-tokenizer always starts a new word, so BPE cannot merge
    across the boundary; if a tokenizer ever did, the prefix check fails and names the row rather
    than shifting the labels by a token.
    """
    prompts, fulls, images = sft_texts(processor, rows)
    prompt_batch = processor(text=prompts, images=images or None, return_tensors="pt", padding=True)
    batch = processor(text=fulls, images=images or None, return_tensors="pt", padding=True)
    n_prompt = prompt_batch["attention_mask"].sum(1)
    labels = batch["input_ids"].clone()
    for i, row in enumerate(rows):
        p = int(n_prompt[i])
        if not torch.equal(prompt_batch["input_ids"][i, :p], batch["input_ids"][i, :p]):
            raise reward.RowError(f"{reward.row_name(row)}: the prompt's tokens are not a prefix of "
                                  f"prompt + target; the label mask would be misplaced")
        labels[i, :p] = IGNORE
    labels[batch["attention_mask"] == 0] = IGNORE
    return dict(batch, labels=labels)


def measure(rows: dict, processor) -> dict:
    """datasets.map function: the length of every sequence and of its assistant part, in tokens.

    Only lengths are stored, not tensors: a real image becomes up to ~1.3k patches x 1176 floats, too
    big to keep for 100k rows, so `collate` runs the processor again on each batch.
    """
    rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
    batch = tokenize(processor, rows)
    return {"n_tokens": batch["attention_mask"].sum(1).tolist(),
            "n_label_tokens": (batch["labels"] != IGNORE).sum(1).tolist()}


def collate(rows: list[dict], processor) -> dict:
    """One micro-batch of tensors; its lengths must be the ones measured up front."""
    batch = tokenize(processor, rows)
    measured = [row["n_tokens"] for row in rows]
    assert batch["attention_mask"].sum(1).tolist() == measured, "tokenization changed since measuring"
    return batch


def prepare_data(args: SFTArgs, processor, accelerator):
    """The split, measured, with sequences longer than --max_length dropped (and counted).

    Dropping a whole sequence is the only safe cut: truncation could split an image's tokens from
    its pixels ("Image features and image tokens do not match", DESIGN.md section 9).
    """
    data = reward.load_split(args.data, args.split)
    # Rank 0 writes the map's cache first; the others then read it instead of racing to write it.
    with accelerator.main_process_first():
        data = data.map(measure, batched=True, batch_size=16, fn_kwargs={"processor": processor},
                        desc="measuring sequences")
    kept = data.filter(lambda n: n <= args.max_length, input_columns="n_tokens")
    accelerator.print(f"{len(kept)} of {len(data)} sequences kept; {len(data) - len(kept)} dropped "
                      f"as longer than --max_length {args.max_length}")
    return kept, len(data) - len(kept)


# ---------------------------------------------------------------------------------------------
# 2. Data order: which rows each process sees at each step
# ---------------------------------------------------------------------------------------------


def micro_batch_plan(n_rows: int, args: SFTArgs, start_step: int, total_steps: int,
                     rank: int, world: int) -> list[list[int]]:
    """Row indices of this process's micro-batches, step by step, from start_step to total_steps.

    Every epoch is a permutation from a generator seeded with (seed + epoch), identical on every
    process, so no broadcast is needed. Step s of an epoch takes rows order[s*G : (s+1)*G] (G = global
    batch); process r takes the r-th of `world` equal slices of them and splits it into micro-batches
    of --per_device_batch_size. A step therefore holds the same G rows for any number of processes;
    the incomplete last global batch of an epoch is dropped (the Trainer's drop_last). Resuming at
    step s only needs s.
    """
    global_batch, per_process = args.global_batch_size, args.global_batch_size // world
    steps_per_epoch = n_rows // global_batch
    plan, order, order_epoch = [], None, None
    for step in range(start_step, total_steps):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            generator = torch.Generator().manual_seed(args.seed + epoch)
            order, order_epoch = torch.randperm(n_rows, generator=generator).tolist(), epoch
        rows = order[position * global_batch:(position + 1) * global_batch]
        mine = rows[rank * per_process:(rank + 1) * per_process]
        plan += [mine[i:i + args.per_device_batch_size]
                 for i in range(0, per_process, args.per_device_batch_size)]
    return plan


# ---------------------------------------------------------------------------------------------
# 3. The loss of one optimizer step, exact under gradient accumulation and data parallelism
# ---------------------------------------------------------------------------------------------


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum over label positions of -log p(token | previous tokens) (next-token cross-entropy).

    Logits are cast to fp32 before the log-softmax: bf16 rounding of a 150k-way softmax is visible.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}  # mm_token_type_ids included (DESIGN 9)
    logits = model(**inputs).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def accumulate_gradients(model, micro_batches: list[dict], accelerator) -> torch.Tensor:
    """Backward of one optimizer step; returns its loss L. Gradients are then exactly grad L, with

        L = sum over all label tokens t of the step (every micro-batch m, every process r) of l_t
            / N,    N = number of those tokens = accelerator.reduce(local count, "sum").

    N is known before any backward (counted from the labels, summed over processes). DDP averages
    gradients over the W processes, so each micro-batch's backward is of
        W * sum_{t in m} l_t / N,
    and the average over processes of the summed micro-batch gradients is grad L. Only the last
    micro-batch synchronises (accelerator.no_sync for the others): one all-reduce per step.
    A mean of per-micro-batch means would weight a token of a short sequence more than one of a
    long sequence, and change with the split.
    """
    world = accelerator.num_processes
    local_count = sum((mb["labels"][:, 1:] != IGNORE).sum() for mb in micro_batches)
    n_tokens = accelerator.reduce(local_count.to(accelerator.device), "sum")
    local_loss = torch.zeros((), device=accelerator.device)
    for i, micro_batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss_sum = token_loss_sum(model, micro_batch)
            accelerator.backward(loss_sum * world / n_tokens)
        local_loss += loss_sum.detach()
    return accelerator.reduce(local_loss, "sum") / n_tokens


# ---------------------------------------------------------------------------------------------
# 4. Model, optimizer, schedule, checkpoints
# ---------------------------------------------------------------------------------------------


def load_model(args: SFTArgs):
    """Model (fp32 master weights; bf16 comes from accelerate's autocast) and processor."""
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "right"  # labels are placed by position from the left
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    if args.freeze_vision:  # deviation from the paper (which trains everything), off by default
        model.model.visual.requires_grad_(False)
    if args.gradient_checkpointing:
        # transformers' default is torch's non-reentrant checkpoint, which works under DDP.
        model.activation_checkpointing_enable()
    return model, processor


def build_optimizer(model, args: SFTArgs, total_steps: int):
    """AdamW with the paper's betas; cosine decay to 0 after a linear warmup of ceil(5%) of the steps.

    No weight decay on biases and norm weights, as transformers' Trainer does (its name rule).
    """
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_NAMES))
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trained if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in trained if n not in decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon)
    warmup = math.ceil(args.warmup_ratio * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return optimizer, scheduler


def save_checkpoint(accelerator, model, processor, folder: str, step: int | None, plan_info: dict):
    """save_pretrained folder (loads like a hub id) + accelerate state (optimizer, schedule, RNG).

    `sft_state.json` is written last: a folder without it is an interrupted save and never resumed.
    The accelerate state repeats the weights (fp32): the price of restoring them bit for bit.
    """
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(
        folder, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        processor.save_pretrained(folder)
    if step is not None:
        accelerator.save_state(os.path.join(folder, "training_state"))
        if accelerator.is_main_process:
            with open(os.path.join(folder, "sft_state.json"), "w") as f:
                json.dump({"step": step, **plan_info}, f)
    accelerator.wait_for_everyone()


def find_checkpoint(args: SFTArgs) -> str | None:
    """The folder to resume from: --resume itself, or the newest complete checkpoint-N."""
    if not args.resume:
        return None
    if args.resume != "latest":
        if not os.path.exists(os.path.join(args.resume, "sft_state.json")):
            raise FileNotFoundError(f"--resume {args.resume}: no sft_state.json (not a complete checkpoint)")
        return args.resume
    found = [d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")
             and os.path.exists(os.path.join(args.output_dir, d, "sft_state.json"))] \
        if os.path.isdir(args.output_dir) else []
    if not found:
        return None  # nothing to resume: start from scratch, so "--resume latest" is always safe
    return os.path.join(args.output_dir, max(found, key=lambda d: int(d.split("-")[1])))


def resume_from(args: SFTArgs, accelerator, plan_info: dict, metrics_path: str) -> int:
    """Restores model, optimizer, schedule and RNG; returns the step to continue after (0: none).

    Metrics the stopped run logged after its last checkpoint are removed: they are computed again.
    """
    if not args.resume:
        return 0
    folder, step = find_checkpoint(args), 0
    if folder is not None:
        with open(os.path.join(folder, "sft_state.json")) as f:
            state = json.load(f)
        for key, value in plan_info.items():
            if state[key] != value:
                raise ValueError(f"{folder}: saved with {key}={state[key]}, this run has {value}; "
                                 f"resume with the same data and batch settings")
        accelerator.load_state(os.path.join(folder, "training_state"))
        step = state["step"]
    if accelerator.is_main_process and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(lines)
    accelerator.wait_for_everyone()  # no rank appends before the file is rewritten
    return step


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by torch; on CPU, the peak resident memory of the process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports kB


# ---------------------------------------------------------------------------------------------
# 5. The loop
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    (args,) = HfArgumentParser(SFTArgs).parse_args_into_dataclasses(args=argv)
    if args.report_to not in ("none", "tensorboard", "wandb"):
        raise ValueError(f"--report_to must be none, tensorboard or wandb, got {args.report_to!r}")
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision if torch.cuda.is_available() else "no",
        log_with=None if args.report_to == "none" else args.report_to, project_dir=args.output_dir,
        # A rank whose micro-batches hold no image leaves the vision tower unused (DESIGN.md section 9).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.global_batch_size % (args.per_device_batch_size * world):
        raise ValueError(f"--global_batch_size {args.global_batch_size} is not a multiple of "
                         f"--per_device_batch_size {args.per_device_batch_size} x {world} processes")
    accumulation = args.global_batch_size // (args.per_device_batch_size * world)
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if not args.resume and os.path.exists(metrics_path):  # a finished or stopped run is never overwritten
        raise FileExistsError(f"{args.output_dir} holds a previous run (metrics.jsonl); continue it with "
                              f"--resume latest or choose another --output_dir")

    model, processor = load_model(args)
    data, n_dropped = prepare_data(args, processor, accelerator)
    steps_per_epoch = len(data) // args.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{args.data} [{args.split}]: {len(data)} usable rows, fewer than one global "
                         f"batch of {args.global_batch_size}")
    total_steps = args.max_steps if args.max_steps > 0 else args.num_epochs * steps_per_epoch
    plan_info = {"n_rows": len(data), "global_batch_size": args.global_batch_size,
                 "total_steps": total_steps, "seed": args.seed}

    optimizer, scheduler = build_optimizer(model, args, total_steps)
    # The scheduler is not passed to prepare(): accelerate's wrapper would step it once per process
    # at each optimizer step. Registering it still saves and restores it with the state.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    start_step = resume_from(args, accelerator, plan_info, metrics_path)
    if args.report_to != "none":
        accelerator.init_trackers("sft", config=asdict(args))

    plan = micro_batch_plan(len(data), args, start_step, total_steps, rank, world)
    loader = DataLoader(data, batch_sampler=plan, collate_fn=partial(collate, processor=processor),
                        num_workers=args.dataloader_num_workers)
    batches = iter(loader)
    accelerator.print(f"{total_steps} steps ({steps_per_epoch} per epoch) of {args.global_batch_size} "
                      f"sequences = {world} processes x {accumulation} micro-batches x "
                      f"{args.per_device_batch_size}; starting after step {start_step}")
    model.train()
    progress = tqdm(total=total_steps, initial=start_step, desc="sft",
                    disable=not accelerator.is_main_process)
    for step in range(start_step + 1, total_steps + 1):
        started = time.perf_counter()
        micro_batches = [{k: v.to(accelerator.device) for k, v in next(batches).items()}
                         for _ in range(accumulation)]
        loss = accumulate_gradients(model, micro_batches, accelerator)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        n_tokens = accelerator.reduce(sum(mb["attention_mask"].sum() for mb in micro_batches), "sum")
        seconds = time.perf_counter() - started
        metrics = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": loss.item(), "lr": lr,
                   "grad_norm": float(grad_norm), "tokens_per_s": n_tokens.item() / seconds,
                   "peak_memory_gb": peak_memory_gb(), "dropped_too_long": n_dropped}
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        accelerator.log(metrics, step=step)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
        if args.save_steps > 0 and step % args.save_steps == 0:
            folder = os.path.join(args.output_dir, f"checkpoint-{step}")
            save_checkpoint(accelerator, model, processor, folder, step, plan_info)
    progress.close()
    save_checkpoint(accelerator, model, processor, os.path.join(args.output_dir, "final"), None, plan_info)
    accelerator.end_training()
    accelerator.print(f"saved {os.path.join(args.output_dir, 'final')}")


if __name__ == "__main__":
    main()
