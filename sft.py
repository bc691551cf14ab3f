"""Supervised fine-tuning of Qwen2.5-VL on reasoning traces (MedVLThinker, arXiv 2508.02669).

The paper's first training paradigm: the model is fine-tuned to reproduce distilled reasoning traces
(R1 traces for m23k, GPT-4o traces for PMC-VQA), written as `<think> ... </think>` then
`<answer> X </answer>` (docs/method.md sections 3 and 6). In the toy world it is also the warm start
that turns the random model into an "instruct" model for RL.

    python sft.py --model Qwen/Qwen2.5-VL-3B-Instruct \
        --data UCSC-VLAA/MedVLThinker-pmc_vqa-gpt_4o_reasoning-tokenized --output_dir out/sft
    python sft.py configs/sft_pmc.yaml --output_dir out/sft   # settings from a file, flags override
    accelerate launch --config_file configs/fsdp.yaml sft.py ...   # the paper: 8 GPUs, FSDP

The story, top to bottom:
1. every row is checked once, before any model work (`reward.check_rows` plus SFT's own rule, a
   trace to learn from), then becomes one sequence: the chat prompt of `reward.build_messages` +
   the SFT target + the end-of-turn token; labels are the assistant tokens only;
2. one pass measures every sequence (images expand to their real number of tokens) and drops, and
   counts, those longer than `--max_length`;
3. each optimizer step sees `--global_batch_size` sequences, split over processes and micro-batches;
   its loss is the sum of the token losses of the whole step over the number of label tokens of the
   whole step, so splitting never changes the gradient;
4. AdamW, cosine schedule with warmup, gradient clipping. The run folder and its checkpoints follow
   the contract of docs/method.md section 10 (runtime.py), shared with grpo.py.

A plain PyTorch loop with accelerate, no Trainer: every number above is visible below.
"""

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, get_cosine_schedule_with_warmup
from transformers.trainer_pt_utils import get_parameter_names

import engine
import reward
import runtime

IGNORE = -100  # label of a position that carries no loss (prompt, padding); F.cross_entropy's default
# Parameter names without weight decay: transformers' Trainer rule (Trainer.get_decay_parameter_names).
NO_DECAY_NAMES = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
# Columns SFT reads: the schema's and the trace (docs/method.md section 2).
COLUMNS = reward.SCHEMA_COLUMNS + ("reasoning",)


@dataclass
class Args:
    """Defaults are the paper's SFT settings (docs/method.md section 6) unless a comment says otherwise."""

    data: str = field(metadata={"help": "Schema dataset with reasoning traces: save_to_disk folder, parquet/jsonl "
                                        "or hub id (the paper's: UCSC-VLAA/MedVLThinker-pmc_vqa-gpt_4o_reasoning-tokenized)."})
    model: str = field(default="Qwen/Qwen2.5-VL-3B-Instruct",
                       metadata={"help": "Hub id or save_pretrained folder (model + processor)."})
    split: str = field(default="train", metadata={"help": "Split of --data (the toy world: sft)."})
    learning_rate: float = 1e-5
    warmup_ratio: float = field(default=0.05, metadata={"help": "Linear warmup share of all steps."})
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8  # not stated in the paper: torch's and transformers' default
    max_grad_norm: float = 1.0
    global_batch_size: int = field(default=16, metadata={
        "help": "Sequences per optimizer step over all processes and micro-batches."})
    micro_batch_size: int = field(default=2, metadata={
        "help": "Sequences per forward pass, per process (as grpo.py's); gradient accumulation steps = "
                "global / (this x processes). 2 = the paper's 16 over 8 GPUs without accumulation."})
    num_epochs: int = 5  # the released checkpoints are from epoch 3 (docs/method.md section 6)
    max_steps: int = field(default=-1, metadata={"help": "If > 0, train this many steps, not epochs."})
    max_length: int = field(default=8192, metadata={
        "help": "Longer sequences are dropped and counted, never cut. Not stated in the paper: ours."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory, same numbers."})
    freeze_vision: bool = field(default=False, metadata={
        "help": "Freeze the vision tower and merger. Off: the paper trains everything."})
    seed: int = 42
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "Processes that run the processor (image resizing) ahead of the GPU."})


# ---------------------------------------------------------------------------------------------
# 1. Rows: checked once, then sequences with labels on the assistant turn only (method.md 3, 6, 10)
# ---------------------------------------------------------------------------------------------


def no_trace(row) -> str | None:
    """SFT's own bad-row rule: no reasoning trace (None) to fine-tune on. An empty trace is kept:
    the official conversion drops only None (a teacher's empty think block gives "")."""
    if isinstance(row.get("reasoning"), str):
        return None
    return f"no reasoning trace to fine-tune on (reasoning is {row.get('reasoning')!r})"


def usable_rows(data, args: Args, on_bad_row: str, accelerator):
    """The rows SFT can train on, and the bad ones as reward.check_rows lists them.

    A row is bad when it breaks a schema rule of `reward.check_rows` (question, options, label,
    answer text, decodable images with a sane aspect ratio, unique key) or has no reasoning trace.
    The check runs once, before any model work, so a long run never dies on row 40,000; every
    process checks every row (same verdict everywhere, no communication). With --on_bad_row error
    all bad rows are named in one RowError; with skip the good rows are kept (a `select`: an index
    list in memory).
    """
    progress = partial(tqdm, desc="checking rows", disable=not accelerator.is_main_process)
    good, bad = reward.check_rows(data, on_bad_row, runtime.data_dir(args.data), progress=progress,
                                  extra_check=no_trace)
    return (data.select(good) if bad else data), bad


def end_of_turn(model, tokenizer) -> str:
    """The token that ends the assistant turn: the first end-of-turn id of the model's
    generation_config (engine.end_of_turn_ids, the ids generate stops at; grpo.py reads the same),
    <|im_end|> for Qwen2.5-VL-Instruct: the token its chat template closes every turn with."""
    return tokenizer.convert_ids_to_tokens(engine.end_of_turn_ids(model)[0])


def sft_texts(processor, rows, end_of_turn: str, base_dir: str = "") -> tuple[list[str], list[str], list]:
    """Prompt texts, full texts (prompt + target + end-of-turn) and the flat list of images.

    full = chat_template(user turn, generation prompt) + "<think> r </think>\\n<answer> X </answer>"
           + end_of_turn ("<|im_end|>" for Qwen2.5-VL)
    with r the stripped trace (reward.sft_target, as the official conversion script writes it).
    The template writes "\\n" after every "<|im_end|>" to separate turns. Generation stops at
    "<|im_end|>", so the model never produces that newline: the sequence ends at "<|im_end|>", and
    the newline is neither an input nor a label (tests/test_sft.py checks that the text is the
    template's rendering of the whole conversation minus that newline). Images become RGB PIL
    images through reward.open_image, whatever the row holds (PIL, datasets' {"bytes", "path"},
    or a file path, relative to `base_dir`, the data file's folder).
    """
    for row in rows:
        if not isinstance(row.get("reasoning"), str):
            raise reward.RowError(f"{reward.row_name(row)}: no reasoning trace to fine-tune on "
                                  f"(SFT needs the `reasoning` column; drop such rows first)")
    rows = [dict(row, images=[reward.open_image(item, base_dir) for item in row.get("images") or []])
            for row in rows]
    prompts, images = reward.chat_prompts(processor, rows)
    fulls = [prompt + reward.sft_target(row["reasoning"], row["answer_label"]) + end_of_turn
             for prompt, row in zip(prompts, rows)]
    return prompts, fulls, images


def tokenize(processor, rows, end_of_turn: str, base_dir: str = "") -> dict:
    """Token ids, attention mask, image inputs and labels for a batch of rows (right padded).

    Image placeholders expand to as many tokens as the image has patches, so prompt and full text
    both go through the processor with the images. The prompt's ids must be a prefix of the full
    ids: then the labels are the full ids with the first len(prompt) positions (and the padding)
    set to IGNORE, i.e. exactly the assistant tokens, "<|im_end|>" included. The prompt ends with
    "assistant\\n", after which Qwen's pre-tokenizer always starts a new word, so BPE cannot merge
    across the boundary; if a tokenizer ever did, the prefix check fails and names the row rather
    than shifting the labels by a token.
    """
    prompts, fulls, images = sft_texts(processor, rows, end_of_turn, base_dir)
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


def collate(positions: list[int], data, lengths: list[int], processor, end_of_turn: str,
            base_dir: str) -> dict:
    """One micro-batch of tensors for rows `positions` of `data`; their lengths must be the ones
    measured up front (a change would break the plan's token accounting silently)."""
    batch = tokenize(processor, [data[i] for i in positions], end_of_turn, base_dir)
    assert batch["attention_mask"].sum(1).tolist() == [lengths[i] for i in positions], \
        "tokenization changed since measuring"
    return batch


def prepare_data(args: Args, data, processor, end_of_turn: str, accelerator):
    """The checked rows, measured, with sequences longer than --max_length dropped (and counted).

    Returns (kept rows, their lengths in tokens, number dropped). One pass runs the processor on
    every row (images expand to their real number of tokens); only the lengths are kept, not the
    tensors: a real image becomes up to ~1.3k patches x 1176 floats, too big to keep for 100k rows,
    so `collate` runs the processor again on each batch. Each process measures its share of the
    rows and gather_object joins the shares in order. Dropping a whole sequence is the only safe
    cut: truncation could split an image's tokens from its pixels ("Image features and image tokens
    do not match", docs/method.md section 9).

    Nothing is written next to the input (docs/method.md section 10): datasets' map/filter on a
    load_from_disk set would write cache-*.arrow files into its folder; plain lists and `select`
    (an index list in memory) do not.
    """
    base_dir = runtime.data_dir(args.data)
    with accelerator.split_between_processes(list(range(len(data)))) as mine:
        lengths = []
        for start in tqdm(range(0, len(mine), 16), desc="measuring sequences",
                          disable=not accelerator.is_main_process):
            batch = tokenize(processor, [data[i] for i in mine[start:start + 16]], end_of_turn, base_dir)
            lengths += batch["attention_mask"].sum(1).tolist()
    lengths = gather_object(lengths)
    # The model's context bounds a sequence too: positions it was never built for are not trained on.
    context = engine.context_length(args.model)
    limit = min(args.max_length, context)
    kept = [i for i, n in enumerate(lengths) if n <= limit]
    bound = f"--max_length {args.max_length}" if limit == args.max_length else \
        f"the model's context ({context} positions; --max_length is {args.max_length})"
    accelerator.print(f"{len(kept)} of {len(data)} sequences kept; {len(data) - len(kept)} dropped "
                      f"as longer than {bound}")
    return data.select(kept), [lengths[i] for i in kept], len(data) - len(kept)


# ---------------------------------------------------------------------------------------------
# 2. Data order: which rows each process sees at each step
# ---------------------------------------------------------------------------------------------


def micro_batch_plan(n_rows: int, args: Args, start_step: int, total_steps: int,
                     rank: int, world: int) -> list[list[int]]:
    """Row indices of this process's micro-batches, step by step, from start_step to total_steps.

    Every epoch is a permutation from a generator seeded with (seed + epoch), identical on every
    process, so no broadcast is needed. Step s of an epoch takes rows order[s*G : (s+1)*G] (G = global
    batch); process r takes the r-th of `world` equal slices of them and splits it into micro-batches
    of --micro_batch_size. A step therefore holds the same G rows for any number of processes;
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
        plan += [mine[i:i + args.micro_batch_size]
                 for i in range(0, per_process, args.micro_batch_size)]
    return plan


# ---------------------------------------------------------------------------------------------
# 3. The loss of one optimizer step, exact under gradient accumulation and data parallelism
# ---------------------------------------------------------------------------------------------


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum over label positions of -log p(token | previous tokens) (next-token cross-entropy).

    Logits are cast to fp32 before the log-softmax: bf16 rounding of a 150k-way softmax is visible.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}  # mm_token_type_ids included (method.md 9)
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
# 4. Model, optimizer, schedule
# ---------------------------------------------------------------------------------------------


def load_model(args: Args):
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


def build_optimizer(model, args: Args, total_steps: int):
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


# ---------------------------------------------------------------------------------------------
# 5. The loop
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    # A YAML/JSON file first (configs/sft_pmc.yaml), flags override.
    args, run = runtime.parse_args(Args, runtime.RunArgs, argv=argv,
                                   defaults={"output_dir": "runs/sft", "save_steps": 500})
    accelerator = runtime.accelerator_for(run)
    world, rank = accelerator.num_processes, accelerator.process_index
    runtime.refuse_nonsense(args, ("learning_rate", "max_grad_norm", "weight_decay", "warmup_ratio"))
    runtime.refuse_below_one(args, ("global_batch_size", "micro_batch_size", "max_length"))
    if args.global_batch_size % (args.micro_batch_size * world):
        raise ValueError(f"--global_batch_size {args.global_batch_size} is not a multiple of "
                         f"--micro_batch_size {args.micro_batch_size} x {world} processes")
    accumulation = args.global_batch_size // (args.micro_batch_size * world)
    set_seed(args.seed)

    # The data and the run folder, before any model work (docs/method.md section 10).
    data = runtime.load_split(args.data, args.split, columns=COLUMNS)
    fingerprint = {"stage": "sft", "settings": runtime.settings(args, run), "model": args.model,
                   "data": runtime.data_fingerprint(data)}
    final = os.path.join(run.output_dir, "final")
    if run.resume and os.path.isdir(final):
        if accelerator.is_main_process:
            # Only a check here: this run's folder has run.json; another run's folder is refused.
            runtime.claim_output_dir(run.output_dir, fingerprint, resume=True, inputs=(args.data, args.model),
                                     schedule="cosine")
        accelerator.print(f"{run.output_dir} is a finished run ({final} exists): nothing to do")
        return
    data, bad = usable_rows(data, args, run.on_bad_row, accelerator)
    runtime.check_model(args.model)  # after the rows (a bad row is named first), before the claim
    if accelerator.is_main_process:
        runtime.claim_output_dir(run.output_dir, fingerprint, resume=bool(run.resume),
                                 inputs=(args.data, args.model), schedule="cosine")
    accelerator.wait_for_everyone()
    checkpoint = runtime.find_checkpoint(run, accelerator)  # a wrong --resume path fails before any change
    if accelerator.is_main_process and run.on_bad_row == "skip":
        runtime.write_bad_rows(bad, run.output_dir)
    if bad:
        accelerator.print(f"{len(bad)} bad row(s) skipped, listed in "
                          f"{os.path.join(run.output_dir, 'bad_rows.jsonl')}")
    metrics_path = os.path.join(run.output_dir, "metrics.jsonl")

    model, processor = load_model(args)
    eot = end_of_turn(model, processor.tokenizer)
    data, lengths, n_dropped = prepare_data(args, data, processor, eot, accelerator)
    steps_per_epoch = len(data) // args.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{args.data} [{args.split}]: {len(data)} usable rows, fewer than one global "
                         f"batch of {args.global_batch_size}")
    total_steps = args.max_steps if args.max_steps > 0 else args.num_epochs * steps_per_epoch
    # What a checkpoint must agree with to be resumed: the same rows in the same steps.
    plan_info = {"n_rows": len(data), "global_batch_size": args.global_batch_size,
                 "total_steps": total_steps, "seed": args.seed}
    runtime.read_state(checkpoint, expect=plan_info)  # before any change to the run folder

    optimizer, scheduler = build_optimizer(model, args, total_steps)
    model, optimizer = runtime.prepare(accelerator, model, optimizer, scheduler)
    start_step = runtime.restore(accelerator, checkpoint, run, metrics_path)["step"]
    accelerator.init_trackers("sft", config=runtime.settings(args, run) | {"model": args.model})

    plan = micro_batch_plan(len(data), args, start_step, total_steps, rank, world)
    # The loader yields positions; collate turns them into rows and tensors.
    loader = DataLoader(range(len(data)), batch_sampler=plan, num_workers=args.dataloader_num_workers,
                        collate_fn=partial(collate, data=data, lengths=lengths, processor=processor,
                                           end_of_turn=eot, base_dir=runtime.data_dir(args.data)))
    batches = iter(loader)
    accelerator.print(f"{total_steps} steps ({steps_per_epoch} per epoch) of {args.global_batch_size} "
                      f"sequences = {world} processes x {accumulation} micro-batches x "
                      f"{args.micro_batch_size}; starting after step {start_step}")
    model.train()
    progress = tqdm(total=total_steps, initial=start_step, desc="sft",
                    disable=not accelerator.is_main_process)
    for step in range(start_step + 1, total_steps + 1):
        started = runtime.synced_time(accelerator.device)
        micro_batches = [{k: v.to(accelerator.device) for k, v in next(batches).items()}
                         for _ in range(accumulation)]
        loss = accumulate_gradients(model, micro_batches, accelerator)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        n_tokens = accelerator.reduce(sum(mb["attention_mask"].sum() for mb in micro_batches), "sum")
        seconds = runtime.synced_time(accelerator.device) - started
        runtime.log(accelerator, metrics_path, {
            "step": step, "epoch": step / steps_per_epoch, "loss": loss.item(), "lr": lr,
            "grad_norm": float(grad_norm), "tokens_per_s": n_tokens.item() / seconds,
            "peak_memory_gb": runtime.peak_memory_gb(accelerator.device), "dropped_too_long": n_dropped})
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        saved = None
        if run.save_steps > 0 and step % run.save_steps == 0:
            saved = runtime.save_checkpoint(accelerator, model, processor, run, step, plan_info)
        stop = runtime.stop_requested(accelerator)  # SIGTERM: the step is done; save it and exit
        if stop and step < total_steps:
            saved = saved or runtime.save_checkpoint(accelerator, model, processor, run, step, plan_info)
            raise runtime.stopped(accelerator, stop, step, saved)
    progress.close()
    if run.save_final:
        card = {"stage": "sft", "base_model": args.model, "datasets": [args.data]}
        final = runtime.save_checkpoint(accelerator, model, processor, run, total_steps, None, card)
    if accelerator.is_main_process and run.save_final:
        accelerator.print(f"report: {runtime.write_report(run.output_dir)}")
    accelerator.end_training()
    runtime.release_output_dir(run.output_dir)
    if run.save_final:
        runtime.push_final(run, final, accelerator)


if __name__ == "__main__":
    runtime.run_main(main)
