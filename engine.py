"""How a model samples and scores tokens: the machinery under evaluate.py's answers, grpo.py's
rollouts and log-probs, and curate's traces. A reader of the paper never needs to open this file:
every path here computes the numbers the stage scripts describe, only faster or at scale.

1. what a sequence is: end-of-turn ids, completion masks, a prompt's length;
2. sampling with HF generate: plain, and with each prompt prefilled once for its n samples
   (`generate_shared`); under FSDP the policy's parameters gathered around it;
3. sampling with vLLM in the process, one implementation for every stage (`VLLM`);
4. the rollout of a training step: generate calls dealt to processes, completions gathered
   (`Engine.rollout`);
5. log-prob passes: plain, with each prompt computed once per group (the shared prompt), and with
   the vocabulary projection in chunks (`Engine.logprobs`).
"""

import contextlib
import math
import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from PIL import Image
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig

import reward
import runtime


@dataclass
class EngineArgs:
    """How grpo.py computes its numbers: none of these changes what is computed, only how (apart
    from --engine: vLLM draws other samples from the same distribution)."""

    engine: str = field(default="hf", metadata={
        "help": "hf: transformers' generate (the reference). vllm: the rollouts and validation's greedy "
                "answers from a vLLM engine in each process, its weights synced after every update "
                "(`make install-vllm`, docs/vllm.md)."})
    share_prompt: bool = field(default=True, metadata={
        "help": "Compute each group's prompt (and its image) once instead of once per sample: in the "
                "rollout's prefill, the log-prob passes and the update. The same numbers up to fp32 "
                "rounding, with less time and memory (docs/method.md section 5); --micro_batch_size a "
                "multiple of --group_size (whole groups) saves the most. False: every sequence "
                "computes its own prompt."})
    micro_batch_size: int = field(default=8, metadata={"help": "Sequences per forward (per process)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per greedy generate call."})
    logprob_chunk_tokens: int = field(default=2048, metadata={
        "help": "Completion tokens whose vocabulary log-softmax is computed at once (0: all of a "
                "micro-batch). The same log-probs; about 14 bytes x vocabulary per token of a chunk "
                "(2048 tokens: 4 GiB at Qwen2.5-VL's 151,936, instead of 65 GiB for 8 x 4096)."})
    gradient_checkpointing: bool = True
    vllm_memory: float = field(default=0.3, metadata={
        "help": "--engine vllm: gpu_memory_utilization, the share of the GPU vLLM may take for its copy "
                "of the weights and its KV cache (the policy, reference and optimizer share the GPU)."})
    vllm_sleep: bool = field(default=True, metadata={
        "help": "--engine vllm on a GPU: after each rollout vLLM sleeps (level 2: its weights and KV cache "
                "freed for the log-prob passes and the update) and wakes before the next, the policy's "
                "weights pushed again. No effect on a CPU (vLLM's CPU backend has no sleep mode)."})
    peak_flops: float = field(default=0.0, metadata={
        "help": "FLOP/s of one process's device, the denominator of `mfu` in metrics.jsonl; 0: measured "
                "once at the start on a large matmul in the compute dtype."})

    def check(self, accelerator=None) -> None:
        runtime.refuse_below_one(self, ("micro_batch_size", "eval_batch_size"))
        if self.logprob_chunk_tokens < 0:
            raise ValueError("--logprob_chunk_tokens must be 0 (no chunks) or more")
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"--engine must be hf or vllm, got {self.engine!r}")
        if self.engine == "vllm":
            check_vllm()
            if accelerator is not None and runtime.is_fsdp(accelerator) and not accelerator.is_fsdp2:
                raise SystemExit(FSDP1_REFUSED)


def check_vllm() -> None:
    """--engine vllm: installed (before any work)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # before any work
        raise SystemExit("--engine vllm needs vLLM, which is not installed: run `make install-vllm` "
                         "(CPU; docs/vllm.md) or see requirements-vllm.txt (GPUs)")


# ---------------------------------------------------------------------------------------------
# 1. Sequences: end of turn, completion masks, prompt lengths
# ---------------------------------------------------------------------------------------------


def end_of_turn_ids(source) -> list[int]:
    """The ids generate stops at: generation_config.eos_token_id of a model, a GenerationConfig or a
    model path (without generation_config.json, the one generate derives from the model's config).
    Qwen2.5-VL-Instruct lists [<|im_end|>, <|endoftext|>]; the first is the token its chat template
    closes a turn with, which SFT's target ends with."""
    if isinstance(source, str):
        from transformers import AutoConfig

        try:
            config = GenerationConfig.from_pretrained(source)
        except OSError:
            config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))
    else:
        config = getattr(source, "generation_config", source)
    ids = config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    if not ids or any(i is None for i in ids):
        raise ValueError(f"{source if isinstance(source, str) else 'the model'}: generation_config has "
                         f"no eos_token_id to end a completion")
    return ids


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


def prompt_length(processor, row, base_dir: str = "", text: str | None = None) -> int:
    """Tokens of a row's chat prompt (or of `text`, a chat text for the row's images), its image
    tokens included, without running the image processor.

    The chat template holds one <|image_pad|> per image, which the processor expands to
    patches / merge^2 tokens; the number of patches follows from the image's size alone.
    """
    if text is None:
        text = processor.apply_chat_template(reward.build_messages(row), add_generation_prompt=True,
                                             tokenize=False)
    n_tokens = len(processor.tokenizer(text)["input_ids"])
    merge = processor.image_processor.merge_size
    for item in row.get("images") or []:
        image = item if isinstance(item, Image.Image) else reward.open_image(item, base_dir)
        patches = processor.image_processor.get_number_of_image_patches(image.height, image.width)
        n_tokens += patches // merge**2 - 1
    return n_tokens


def context_length(model_path: str) -> int:
    """The model's context: the positions its language model was built for (max_position_embeddings
    of its text config). A longer prompt is skipped in every stage, never fed."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path).get_text_config().max_position_embeddings


def usable_prompts(dataset, data: str, split: str, processor, max_prompt_length: int, on_bad_row: str,
                   accelerator):
    """The rows that can be prompts, and the skipped ones as reward.check_rows lists them.

    Every row passes `reward.check_rows` once, before any model work (docs/method.md section 10): a
    bad row is an error naming it, or with --on_bad_row skip a counted skip. A prompt longer than
    `max_prompt_length` is skipped and counted, never cut (cutting would drop image tokens or the
    options), whatever --on_bad_row says. The main process checks; the others receive its verdict.
    """
    where = f"{data}:{split}"
    verdict = [None]
    if accelerator.is_main_process:
        base_dir = runtime.data_dir(data)
        good, bad = reward.check_rows(dataset, on_bad_row, base_dir,
                                      progress=partial(tqdm, desc=f"checking {where}", leave=False))
        kept = []
        for i in tqdm(good, desc=f"measuring the prompts of {where}", leave=False):
            row = dataset[i]
            n_tokens = prompt_length(processor, row, base_dir)
            if n_tokens <= max_prompt_length:
                kept.append(i)
            else:
                bad.append({"position": i, "dataset_name": row.get("dataset_name"),
                            "dataset_index": row.get("dataset_index"),
                            "reason": f"{reward.row_name(row)}: prompt of {n_tokens} tokens > "
                                      f"max_prompt_length {max_prompt_length}"})
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


# ---------------------------------------------------------------------------------------------
# 2. Sampling with HF generate
# ---------------------------------------------------------------------------------------------


def generation_positions(model, inputs):
    """The [4, n, P] positions `generate` builds for Qwen2.5-VL (transformers 5,
    `_prepare_position_ids_for_generation`): row 0 the text positions (attention-mask cumsum, pads 0),
    rows 1-3 the 3-D rotary positions (`get_rope_index` with an image in the batch, else row 0)."""
    mask = inputs["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if inputs.get("image_grid_thw") is not None:
        rope, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    else:
        rope = text.unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text.unsqueeze(0), rope], 0)


def generate_shared(model, inputs, group_size: int, **gen_kwargs):
    """`model.generate` on `inputs` with every prompt repeated group_size times, each prompt prefilled
    once: the n distinct prompts run once (all but their last token, image included) into a
    DynamicCache, which is repeated G times (`batch_repeat_interleave`); generate then finds P - 1
    tokens cached and runs only the last prompt token, n G x 1, and samples as usual.

    `inputs`: the processor's output for the n prompts, left padded. Returns sequences [n G, P + new]
    in the plain call's order (rows i G .. i G + G - 1 for prompt i). The positions are passed (the
    4 rows generate itself would build): otherwise generate would add the model's `rope_deltas`,
    which the prefill left with n rows, not n G. The sampler draws from [n G, vocab] probabilities
    at every step, as in the plain call, so a seed gives the same samples (tests/test_shared_prompt.py:
    token for token, text, image and mixed prompts), unless a rounding difference of ~1e-7 in a
    probability moves a draw across a boundary. `model` is the unwrapped model in eval mode.
    What it saves: the prompt's forward (and the vision tower on its image) G - 1 times; the KV
    cache is G x P as in the plain call (repeated after the prefill).
    """
    G, ids, mask = group_size, inputs["input_ids"], inputs["attention_mask"]
    if not bool(mask[:, -1].all()):
        raise ValueError("generate_shared needs left-padded prompts: the last column must be every "
                         "prompt's last token")
    mm = inputs.get("mm_token_type_ids")
    mm = torch.zeros_like(ids) if mm is None else mm
    positions = generation_positions(model, inputs)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], mm_token_type_ids=mm[:, :-1],
              position_ids=positions[..., :-1], pixel_values=inputs.get("pixel_values"),
              image_grid_thw=inputs.get("image_grid_thw"), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        cache.batch_repeat_interleave(G)
        return model.generate(input_ids=ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0),
                              mm_token_type_ids=mm.repeat_interleave(G, 0),
                              position_ids=positions.repeat_interleave(G, 1), past_key_values=cache,
                              **gen_kwargs)


@torch.no_grad()
def sample(model, processor, rows: list[dict], n: int, gen_kwargs: dict, share_prompt: bool = False,
           texts: list[str] | None = None, **extra) -> torch.Tensor:
    """HF generate on `rows`, n samples each: the new tokens [rows x n, L], row i's at [i n, (i+1) n).

    Prompts and images are repeated n times before the processor call (not num_return_sequences,
    which expands pixel_values inside generate only), so every later pass has one prompt per
    sequence (docs/method.md section 9). The processor gets only real images, so a call may mix image
    and text-only rows, and it returns mm_token_type_ids, without which Qwen2.5-VL falls back to 1-D
    positions. Left padding: generation continues every prompt at its end. share_prompt (and n > 1):
    the rows once, each prefilled once and its cache repeated n times (`generate_shared`): the same
    sequences in the same order. texts: the rows' chat texts, when they are not the task's prompt
    (synth.py's); the rows then give only their images. The caller seeds the sampler.
    """
    shared = share_prompt and n > 1
    copies = 1 if shared else n
    if texts is None:
        texts, images = reward.chat_prompts(processor, [row for row in rows for _ in range(copies)])
    else:
        texts = [text for text in texts for _ in range(copies)]
        images = [image for row in rows for _ in range(copies) for image in (row.get("images") or [])]
    inputs = processor(text=texts, images=images or None, padding=True, padding_side="left",
                       return_tensors="pt").to(model.device)
    if shared:
        sequences = generate_shared(model, inputs, n, **gen_kwargs, **extra)
    else:
        sequences = model.generate(**inputs, **gen_kwargs, **extra)
    return sequences[:, inputs["input_ids"].shape[1]:]


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
    (`Engine.rollout`), so that processes whose samples end early keep joining the all-gathers.
    """
    if not runtime.is_fsdp(accelerator):
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


FSDP1_REFUSED = "--engine vllm under FSDP needs fsdp_version 2 (configs/fsdp.yaml), not 1"


def full_weights(model, accelerator):
    """The policy's weights as (name, full tensor) pairs, the names of its save_pretrained files,
    for vLLM's copy. Unsharded (one process, DDP): the unwrapped model's own tensors. FSDP2: each
    parameter all-gathered once (DTensor.full_tensor), one at a time, so a sync holds one full
    tensor beyond the shards; every process must take every pair (the gathers are collective).
    A tensor under several names (the tied embedding and output layer) is gathered once and given
    under each name at once, as vLLM's loader reads both. FSDP (v1) is refused: its flat parameters
    carry wrapper names and summon_full_params gathers everything at once."""
    if runtime.is_fsdp(accelerator) and not accelerator.is_fsdp2:
        raise SystemExit(FSDP1_REFUSED)
    from torch.distributed.tensor import DTensor

    names = {}  # id of a parameter -> its names, in the state dict's order
    state = accelerator.unwrap_model(model).state_dict(keep_vars=True)  # tied: one Parameter
    for name, tensor in state.items():
        names.setdefault(id(tensor), []).append(name)
    for same in names.values():
        tensor = state[same[0]]
        full = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()
        for name in same:
            yield name, full


# ---------------------------------------------------------------------------------------------
# 3. Sampling with vLLM (optional: `make install-vllm`, docs/vllm.md)
# ---------------------------------------------------------------------------------------------


def vllm_sampling(gen_kwargs: dict, n: int, vocab_size: int, stop_ids: list[int]) -> dict:
    """SamplingParams' arguments with the meaning of reward.generation_kwargs' HF settings.

    Derived from that one dict so both engines always sample alike: temperature (0 = greedy), top_p,
    no top_k (0 disables it in vLLM), no repetition penalty, max_new_tokens. HF's suppress_tokens
    becomes its complement, allowed_token_ids (both mask the logits before temperature and top_p).
    The stop ids are HF generate's (generation_config.eos_token_id), so a completion ends at the
    first end-of-turn as in HF. A setting added to generation_kwargs that is not translated here is
    an error, not silently dropped.
    """
    known = {"max_new_tokens", "repetition_penalty", "suppress_tokens", "do_sample", "temperature",
             "top_k", "top_p", "min_p", "num_beams"}
    unknown = set(gen_kwargs) - known
    if unknown or gen_kwargs.get("num_beams", 1) != 1 or gen_kwargs.get("min_p") is not None:
        raise ValueError(f"generation settings vLLM is not told about: {sorted(unknown)}")
    never = set(gen_kwargs["suppress_tokens"] or [])
    sampled = gen_kwargs["do_sample"]
    return dict(n=n, max_tokens=gen_kwargs["max_new_tokens"],
                temperature=gen_kwargs["temperature"] if sampled else 0.0,
                top_p=gen_kwargs["top_p"] if sampled else 1.0, top_k=gen_kwargs["top_k"] or 0,
                repetition_penalty=gen_kwargs["repetition_penalty"],
                allowed_token_ids=[i for i in range(vocab_size) if i not in never],
                stop_token_ids=stop_ids)


def max_images(dataset, rows=()) -> int:
    """The most images one prompt of `dataset` (or of `rows`) holds, at least 1: vLLM's per-prompt
    limit."""
    import pyarrow.compute

    counts = [1] + [len(row.get("images") or []) for row in rows]
    if dataset is not None and "images" in dataset.column_names:
        lengths = pyarrow.compute.list_value_length(dataset.with_format("arrow")["images"])
        counts.append(pyarrow.compute.max(lengths).as_py() or 0)
    return max(counts)


class VLLM:
    """A vLLM engine in this process (colocated, as TRL's colocate mode and verl's hybrid engine):
    evaluate.py's answers and grpo.py's rollouts.

    The same as the HF path: the prompts (reward.chat_prompts, one `<|image_pad|>` per image, which
    vLLM expands; image and text-only rows in one call), the sampling settings (`vllm_sampling`),
    the stop at the first end-of-turn, and what comes back (each completion's ids up to and including
    that token, and whether it was truncated).

    Differs:
    - Continuous batching and a paged KV cache: a finished sequence leaves the running batch at once.
      A request's n samples share one prefill by themselves.
    - Seeds: vLLM draws each request from its own generator (its n samples from seed, seed + 1, ...),
      so requests are seeded one by one; the two engines draw different samples from the same
      distribution.
    - vLLM holds its own copy of the weights. `generate` with a policy and the step its weights are
      from pushes them first when vLLM's copy is older (`sync`): `collective_rpc("reload_weights")`,
      the path that works on vLLM's CPU backend as on GPUs (TRL's `model_runner.model.load_weights`
      fails on the CPU backend's repacked linear weights), then the encoder cache (image features of
      the old weights; without this reset the next image request fails) and the prefix cache are
      emptied.
    - Sleep mode (GPUs, `sleep`): after each generate vLLM sleeps at level 2, its copy of the weights
      and its KV cache freed for the log-prob passes and the update (as TRL's colocate mode does);
      the next call allocates the weights, pushes the policy's (the copy was dropped), then allocates
      the KV cache and samples. Checked on a CPU against a stand-in engine (the order of the calls,
      tests/test_vllm.py); not yet run on a GPU.
    Several processes (`accelerate launch`): one engine in each, as verl's hybrid engine and TRL's
    colocate mode run them, through vLLM's "external_launcher" executor, which joins the process
    group accelerate made (gloo on CPUs, NCCL on GPUs) instead of starting its own. Each process's
    engine serves only that process's prompts and holds that process's copy of the policy; no engine
    waits for another. Every process must build its engine (vLLM makes its process groups then) and
    close it last (`close`).
    Set-up: max_model_len is the longest prompt + max_new_tokens; chunked prefill off with a token
    budget of at least that, so no prompt is split over engine steps (on CPU, a seeded request split
    so fails: "CPU Generator does not use offset"); the engine in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0); OMP_NUM_THREADS set to torch's thread count if unset
    (otherwise vLLM cuts the process to one thread); on CPU a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE)
    unless set, and no CUDA graphs. processed_logprobs: log-probs, when asked (the tests), after the
    temperature and the mask.
    """

    def __init__(self, model: str, dtype: str, seed: int, max_model_len: int, memory: float,
                 images_per_prompt: int, sleep: bool = False, processes: int = 1, tensor_parallel: int = 1):
        cuda = torch.cuda.is_available()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        import vllm  # check_vllm has checked that it is installed

        self.sleeps = cuda and sleep
        self.llm = vllm.LLM(
            model=model, dtype=dtype, seed=seed, max_model_len=max_model_len, enable_chunked_prefill=False,
            max_num_batched_tokens=max(max_model_len, 8192), enforce_eager=not cuda,
            gpu_memory_utilization=memory, limit_mm_per_prompt={"image": images_per_prompt, "video": 0},
            logprobs_mode="processed_logprobs", enable_sleep_mode=self.sleeps,
            distributed_executor_backend="external_launcher" if processes > 1 else None,
            tensor_parallel_size=tensor_parallel)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.version = None  # the step of the policy weights vLLM holds; None: the model it loaded
        self.asleep = False
        self.sync_seconds: list[float] = []

    def sync(self, weights) -> None:
        """Push the policy's weights ((name, tensor) pairs, `full_weights`: the fp32 master copy; vLLM
        casts to its dtype) into vLLM."""
        start = runtime.synced_time(torch.device("cpu"))
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        self.sync_seconds.append(runtime.synced_time(torch.device("cpu")) - start)

    def close(self) -> None:
        """Shut the engine down, after the run's last collective: with several processes it
        destroys the run's own process group, which vLLM's workers share (external launcher); with
        one, vLLM's exit handler would otherwise fail on a group accelerate has destroyed."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, processor, rows: list[dict], n: int, gen_kwargs: dict, eos_ids: list[int],
                 seeds: list, policy=None, version=None, texts: list[str] | None = None) -> list[tuple[list[int], bool]]:
        """n completions of every row, row i's at [i n, (i + 1) n): (ids up to and including the first
        end-of-turn token, truncated). seeds: one per row (None: unseeded, as for greedy). policy,
        version: the weights to sample from ((name, tensor) pairs, `full_weights`) and the step they
        are from; pushed when newer, also when `rows` is empty (under FSDP every process gathers).
        texts: the rows' chat texts when they are not the task's prompt (synth.py's)."""
        from vllm import SamplingParams

        if self.asleep:  # level 2 dropped the weights: room for them first, then the policy's
            self.llm.wake_up(tags=["weights"])
        if policy is not None and (self.asleep or version != self.version):
            self.sync(policy)
            self.version = version
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        params = vllm_sampling(gen_kwargs, n, self.vocab_size, eos_ids)
        if texts is None:
            texts, _ = reward.chat_prompts(processor, rows)
        # Text-only rows carry no multi_modal_data: one call mixes both.
        prompts = [{"prompt": text, **({"multi_modal_data": {"image": row["images"]}} if row.get("images")
                                       else {})} for text, row in zip(texts, rows)]
        outputs = self.llm.generate(prompts, [SamplingParams(**params, seed=seed) for seed in seeds],
                                    use_tqdm=False) if prompts else []
        if self.sleeps:  # the GPU memory goes to the log-prob passes and the update until the next call
            self.llm.sleep(level=2)
            self.asleep = True
        completions = []
        for output in outputs:
            for sample_ in sorted(output.outputs, key=lambda c: c.index):
                ids = list(sample_.token_ids)
                end = next((t for t, i in enumerate(ids) if i in eos_ids), None)
                completions.append((ids, True) if end is None else (ids[:end + 1], False))
        return completions


# ---------------------------------------------------------------------------------------------
# 4. The engine of a training run: rollouts and log-probs
# ---------------------------------------------------------------------------------------------


class Engine:
    """Sampling and scoring for grpo.py: `rollout` (HF generate or vLLM) and `logprobs` (plain or
    shared prompt, chunked), with the run's special ids. One per run."""

    def __init__(self, args: EngineArgs, accelerator, processor, model, model_path: str, seed: int,
                 max_model_len: int, images_per_prompt: int):
        self.args, self.accelerator, self.processor = args, accelerator, processor
        self.pad_id = processor.tokenizer.pad_token_id
        self.never_ids = reward.never_generate_ids(processor.tokenizer)
        self.eos_ids = end_of_turn_ids(accelerator.unwrap_model(model))
        self.vllm = None
        if args.engine == "vllm":
            dtype = "bfloat16" if accelerator.mixed_precision == "bf16" else "float32"
            self.vllm = VLLM(model_path, dtype, seed, max_model_len, args.vllm_memory, images_per_prompt,
                             sleep=args.vllm_sleep, processes=accelerator.num_processes)

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()

    @torch.no_grad()
    def rollout(self, model, rows: list[dict], group_size: int, gen_kwargs: dict, batch_size: int,
                seed: tuple | None = None, version: int = 0, desc: str | None = None):
        """G completions of every row, on every process; row i's are completions [i G, (i + 1) G),
        each (its tokens up to and including the first end-of-turn token, truncated).

        Batching is a function of positions in `rows` only, so the rollout is the same on any number
        of processes (docs/method.md section 5): generate call k takes rows [k b, (k + 1) b) (b =
        batch_size), each repeated G times, left padded; call k runs on process k mod W, its sampler
        seeded from (run seed, step, k b); then every process receives every completion (token ids
        only, a few bytes a token). seed: (run seed, step), or None when greedy. version: the number
        of updates the policy has had (vLLM's copy is pushed when it is older). desc: a progress bar
        of that name over the main process's prompts. With --engine vllm the prompts of this
        process's calls go to its engine at once, each prompt seeded from (run seed, step, its
        position), and are received by every process the same way.
        """
        accelerator, unwrapped = self.accelerator, self.accelerator.unwrap_model(model)
        world, rank = accelerator.num_processes, accelerator.process_index
        calls = list(range(0, len(rows), batch_size))
        mine = calls[rank::world]
        if self.vllm is not None:
            positions = [i for start in mine for i in range(start, min(start + batch_size, len(rows)))]
            seeds = [None if seed is None else reward.sampling_seed(*seed, i) for i in positions]
            new = self.vllm.generate(self.processor, [rows[i] for i in positions], group_size, gen_kwargs,
                                     self.eos_ids, seeds, policy=full_weights(model, accelerator), version=version)
            local, taken = [], 0
            for start in mine:
                count = len(rows[start:start + batch_size]) * group_size
                local.append((start, new[taken:taken + count]))
                taken += count
            by_start = dict(gather_object(local))
            return [completion for start in calls for completion in by_start[start]]
        was_training = unwrapped.training
        unwrapped.eval()  # gradient checkpointing is off in eval mode, so generate keeps its KV cache
        # FSDP (v1) gathers layers inside generate (full_parameters): every process must join every
        # all-gather, so each makes the same number of calls (the extra ones repeat the first call
        # and are dropped) and keeps stepping until all are done (synced_gpus). FSDP2 has gathered it.
        sync = runtime.is_fsdp(accelerator) and not accelerator.is_fsdp2 and world > 1
        cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
        padding = calls[:1] * (math.ceil(len(calls) / world) - len(mine)) if sync else []
        local = []
        bar = tqdm(total=sum(len(rows[start:start + batch_size]) for start in mine), desc=desc,
                   unit="prompt", leave=False, disable=desc is None or not accelerator.is_main_process)
        with full_parameters(model, accelerator):
            for k, start in enumerate(mine + padding):
                chunk = rows[start:start + batch_size]
                with torch.random.fork_rng(devices=cuda):
                    if seed is not None:
                        torch.manual_seed(reward.sampling_seed(*seed, start))
                    new = sample(unwrapped, self.processor, chunk, group_size, gen_kwargs,
                                 self.args.share_prompt, synced_gpus=sync)
                if k < len(mine):
                    local.append((start, cut_completions(new, self.eos_ids)))
                    bar.update(len(chunk))
        bar.close()
        unwrapped.train(was_training)
        by_start = dict(gather_object(local))
        return [completion for start in calls for completion in by_start[start]]

    def logprobs(self, model, sequences: list, temperature: float, with_entropy: bool = False):
        """log pi(o_t | q, o_<t) of a micro-batch of sequences (each with prompt_ids,
        mm_token_type_ids, pixel_values, image_grid_thw, completion_ids): logp [n, C], the
        entropy of each position's distribution (zeros unless asked; without gradient) and the
        completion mask [n, C]. With --share_prompt each run of sequences with the same prompt
        computes it once (section 5); the numbers are the plain path's up to fp32 rounding."""
        collate_fn, logprob_fn = ((collate_shared, shared_completion_logprobs) if self.args.share_prompt
                                  else (collate, completion_logprobs))
        batch = collate_fn(sequences, self.pad_id, self.accelerator.device)
        out = logprob_fn(model, batch, temperature, self.never_ids, with_entropy=with_entropy,
                         chunk_tokens=self.args.logprob_chunk_tokens)
        logp, entropy = out if with_entropy else (out, None)
        return logp, entropy, batch["completion_mask"]


# ---------------------------------------------------------------------------------------------
# 5. Log-prob passes
# ---------------------------------------------------------------------------------------------


def collate(samples: list, pad_id: int, device) -> dict:
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


# ---------------------------------------------------------------------------------------------
# The shared prompt: the log-probs with each group's prompt computed once
# ---------------------------------------------------------------------------------------------
# Why the numbers are the same (the idea is published for GRPO as a shared-prefix forward,
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
# `generate_shared`, which evaluate.py's --share_prompt uses for its n samples too.
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


def prompt_runs(samples: list) -> list[int]:
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


def collate_shared(samples: list, pad_id: int, device) -> dict:
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
    switch for such caches) while the passes run. Needs non-reentrant checkpointing (grpo.py's `load_models`):
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
