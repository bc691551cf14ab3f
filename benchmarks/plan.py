"""What one GRPO step of the paper costs on 8 GPUs: parameters, memory, FLOPs, time (issue 12, part 4).

No GPU and no weights are needed: the two models are built on PyTorch's meta device from their exact
configurations (written out below), so the parameter counts are exact; everything else is arithmetic
on the paper's settings and on assumptions, each of them a flag:

    .venv/bin/python benchmarks/plan.py                                  # the paper's settings
    .venv/bin/python benchmarks/plan.py --mean_new_tokens 900 --micro_batch_size 2

It prints one markdown table (docs/real_path.md holds its output and the reasoning behind each row).
The arithmetic follows what grpo.py does, not an idealised trainer: the policy is loaded in fp32
(accelerate's bf16 mixed precision computes in bf16), the frozen reference is a bf16 copy on every
GPU (not sharded), prompts are repeated G times before generate, log-probs keep only the completion's
logits (`logits_to_keep`) and log-softmax them --logprob_chunk_tokens at a time (one chunk's logits
alive), gradient checkpointing recomputes each layer's forward, and under FSDP2 (configs/fsdp.yaml)
the whole policy is gathered in bf16 once per rollout (`--fsdp_version 1`: grpo.py's v1 path, the
root unit in fp32 and every layer all-gathered at every decode step).

Worked by hand (the defaults; GiB = 2^30 bytes; N = 3,754,622,976 for the 3B, 8,292,166,656 for
the 7B; sequences padded to 2048 + 4096 = 6144 tokens):
- one chunk of logits: 2048 tokens x 151,936 entries x 14 bytes = 4,356,308,992 B = 4.06 GiB (3B);
  x 152,064 for the 7B: 4.06 GiB. Unchunked (--logprob_chunk_tokens 0): 8 x 4096 tokens, 64.9 GiB.
- whole policy gathered in bf16 (FSDP2): 2 x N = 6.99 GiB (3B), 15.45 GiB (7B).
- 3B, FSDP2 peak: states 16 x N / 8 = 6.99 GiB + reference 2 x N = 6.99 + reserve 3 = 16.99; generate:
  6.99 (gathered) + KV cache 2 x 36 layers x 256 (2 kv heads x 128) x 2 bytes = 36,864 B/token
  x 64 sequences x 6144 tokens = 13.50 GiB = 20.49, so 37.48 GiB (printed 37.5); the update is
  smaller: layer inputs 36 x 49,152 tokens x 2048 x 2 B = 6.75, one layer 49,152 x (8 x 2048 + 2 x
  256 + 4 x 11008) x 2 B = 5.58, one chunk 4.06, gathered units 8 B x 349,380,864 (root: embedding,
  norm, vision patch embedding and merger) + 4 B x 77,076,992 (2 decoder layers) = 2.89; 19.28.
- 3B, DDP peak: 16 x N = 55.95 + 6.99 + 3 = 65.94, + generate: 13.50 KV cache + autocast's bf16
  copies of the decoder layers and output layer, 2 x (2,774,771,712 + 311,164,928) B = 5.75 GiB,
  = 85.19 GiB: does not fit, whatever the micro-batch (the generate call sets it). It takes
  --generation_batch_size 4 (5.75 + 6.75 = 12.50) and --micro_batch_size 5 at most (layer inputs
  4.22 + autocast's copies 5.75 + one chunk 4.06 at the end of the forward = 14.03): 79.97 of 80.
"""

import math
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

# The released configurations (config.json of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct).
# Checked against public copies of both config.json files and, where they exist, the defaults of
# transformers' Qwen2_5_VLVisionConfig (depth 32, intermediate 3420, heads 16, patch 14, merge 2,
# temporal patch 2, window 112, full-attention blocks 7/15/23/31) and Qwen2_5_VLTextConfig
# (rope_theta 1e6); transformers' text defaults are the 72B's, so the 3B/7B text sizes come from the
# config.json copies only. The 7B's vocabulary is 152,064 rows (3B: 151,936): with it the 7B has
# the 8,292,166,656 parameters its model card states (3B: 3,754,622,976).
VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112,
              fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
MODELS = {
    "3B": dict(text=dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                         intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
               out_hidden_size=2048),
    "7B": dict(text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
               out_hidden_size=3584),
}
GIB = 2 ** 30


@dataclass
class PlanArgs:
    """The paper's GRPO settings (arXiv 2508.02669, m23k run) and the assumptions of the estimate."""

    models: str = field(default="3B,7B", metadata={"help": "Comma-separated: 3B, 7B."})
    # The paper's settings.
    prompts: int = field(default=256, metadata={"help": "B: prompts per step (paper)."})
    group_size: int = field(default=8, metadata={"help": "G: samples per prompt (paper)."})
    max_new_tokens: int = field(default=4096, metadata={"help": "Longest completion (paper)."})
    max_prompt_tokens: int = field(default=2048, metadata={"help": "Longest prompt (grpo.py default)."})
    mini_batch: int = field(default=128, metadata={"help": "Prompts per optimizer step (paper): 2 updates/step."})
    steps: int = field(default=320, metadata={"help": "Steps of the run (paper: m23k, 5 epochs = 320)."})
    # Assumptions about the data (flags: measure them, e.g. completion_length in metrics.jsonl).
    mean_new_tokens: int = field(default=600, metadata={
        "help": "ASSUMPTION: mean completion length; the max is only reached by runaway samples."})
    mean_prompt_tokens: int = field(default=300, metadata={
        "help": "ASSUMPTION: mean prompt length with the chat template (m23k questions: a few hundred)."})
    image_tokens: int = field(default=0, metadata={
        "help": "ASSUMPTION: image tokens per prompt after the 2x2 merge (m23k: 0, text only; "
                "PMC-VQA images are resized, a few hundred)."})
    # Assumptions about the machine and the code.
    n_gpus: int = field(default=8, metadata={"help": "GPUs (paper: 8)."})
    gpu: str = field(default="H100 80GB SXM", metadata={"help": "ASSUMPTION: the GPU (name for the table)."})
    gpu_memory_gib: float = field(default=80.0, metadata={"help": "Memory per GPU."})
    peak_tflops: float = field(default=989.0, metadata={"help": "Dense bf16 TFLOP/s per GPU (H100 SXM: 989)."})
    hbm_tbs: float = field(default=3.35, metadata={"help": "HBM bandwidth per GPU, TB/s (H100 SXM: 3.35)."})
    link_gbs: float = field(default=450.0, metadata={
        "help": "Per-GPU all-gather bandwidth, GB/s, one direction (NVLink 4: 450)."})
    train_mfu: float = field(default=0.35, metadata={
        "help": "ASSUMPTION: model FLOPs utilisation of the log-prob passes and the update."})
    generate_mfu: float = field(default=0.02, metadata={
        "help": "ASSUMPTION: MFU of HF generate, in useful FLOPs (decoding is memory- and launch-bound, and a "
                "call runs to its longest sample; the HBM floor row allows ~2-3%%; benchmarks/gpu_check.sh "
                "measures it)."})
    generation_batch_size: int = field(default=8, metadata={
        "help": "Prompts per generate call (grpo.py default): x G sequences share one KV cache."})
    micro_batch_size: int = field(default=8, metadata={"help": "Sequences per forward/backward (grpo.py default)."})
    reserve_gib: float = field(default=3.0, metadata={
        "help": "ASSUMPTION: memory per GPU not available to tensors (CUDA context, NCCL buffers, fragmentation)."})
    fsdp_version: int = field(default=2, metadata={
        "help": "configs/fsdp.yaml's fsdp_version. 2 (the default): grpo.py gathers the whole policy in bf16 "
                "once per rollout (engine.full_parameters). 1: the root unit (embedding, output layer, vision "
                "patch embedding and merger) gathered in fp32 for the rollout, every decoder layer "
                "all-gathered in bf16 at every decode step."})
    logprob_chunk_tokens: int = field(default=2048, metadata={
        "help": "grpo.py --logprob_chunk_tokens: completion tokens whose logits exist at a time (0: all of "
                "the micro-batch's)."})
    logit_bytes: int = field(default=14, metadata={
        "help": "ASSUMPTION: bytes per completion logit alive in a training micro-batch: bf16 logits (2), "
                "fp32 logits / T kept for log-softmax (4), fp32 softmax for the entropy (4), its gradient (4)."})


def build_config(name: str) -> Qwen2_5_VLConfig:
    spec = MODELS[name]
    text = dict(spec["text"], max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(VISION, out_hidden_size=spec["out_hidden_size"]),
                            tie_word_embeddings=spec["text"]["tie_word_embeddings"])


def count_parameters(config) -> dict:
    """Exact counts from the model itself, built on the meta device (shapes, no memory, no weights).

    A tied output layer is the embedding's tensor: counted once in `total`, but its matmul still runs,
    so `head` (vocab x hidden) is counted for FLOPs either way.
    """
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    text = model.model.language_model
    layers = sum(p.numel() for p in text.layers.parameters())
    vision_blocks = sum(p.numel() for p in model.model.visual.blocks.parameters())
    return dict(
        total=sum(p.numel() for p in model.parameters()),
        layers=layers, vision=sum(p.numel() for p in model.model.visual.parameters()),
        vision_blocks=vision_blocks, embedding=text.embed_tokens.weight.numel(),
        head=model.lm_head.weight.numel(), tied=model.lm_head.weight is text.embed_tokens.weight,
        # The FSDP root unit (everything outside the wrapped decoder layers and vision blocks).
        root=sum(p.numel() for p in model.parameters()) - layers - vision_blocks,
        largest_unit=max(sum(p.numel() for p in text.layers[0].parameters()),
                         sum(p.numel() for p in model.model.visual.blocks[0].parameters())),
    )


def attention_flops(layers: int, width: int, prefix: int, new: int) -> float:
    """Forward FLOPs of causal attention (QK^T and AV, 2 x 2 FLOPs per query-key pair and channel)
    for `new` tokens after `prefix` cached ones: each new token t attends to prefix + t keys."""
    pairs = new * prefix + new * (new + 1) / 2
    return 4.0 * layers * width * pairs


def vision_flops(p: dict, args: PlanArgs) -> float:
    """Forward FLOPs of the vision tower for one prompt's images (0 for text-only data).

    Patches = 4 x image tokens (2 x 2 merge). Window blocks attend within 112 px windows
    (8 x 8 = 64 patches); the 4 full-attention blocks attend over all patches.
    """
    patches = 4 * args.image_tokens
    if not patches:
        return 0.0
    width, window = VISION["hidden_size"], (VISION["window_size"] // VISION["patch_size"]) ** 2
    n_full = len(VISION["fullatt_block_indexes"])
    attention = 4.0 * width * patches * (n_full * patches + (VISION["depth"] - n_full) * min(window, patches))
    return 2.0 * p["vision"] * patches + attention


def step_flops(config, p: dict, args: PlanArgs) -> dict:
    """Model FLOPs of one step at the mean lengths: 2N per token forward, 6N forward + backward.

    N per token: the decoder layers' parameters; plus the output layer (vocab x hidden) where logits
    are computed (every generated token, and the completion tokens of the log-prob and training
    passes, which keep only those logits). Gradient checkpointing recomputes the forward (8N really
    executed); MFU counts the 6N, as is the convention.
    """
    text = config.text_config
    width = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    L, P, C = text.num_hidden_layers, args.mean_prompt_tokens + args.image_tokens, args.mean_new_tokens
    n_seq = args.prompts * args.group_size
    body, head = p["layers"], p["head"]
    vision = vision_flops(p, args)
    # Rollout: every sequence prefills its own copy of the prompt (prompts are repeated G times).
    prefill = 2.0 * body * P + attention_flops(L, width, 0, P) + vision
    decode = 2.0 * (body + head) * C + attention_flops(L, width, P, C)
    generate = n_seq * (prefill + decode)
    # One forward over prompt + completion, logits on the completion only.
    forward = 2.0 * body * (P + C) + 2.0 * head * C + attention_flops(L, width, 0, P + C) + vision
    updates = args.prompts // args.mini_batch
    logprob_passes = 1 + (updates > 1)  # reference always (beta > 0); old policy when off-policy
    return dict(generate=generate, logprob=n_seq * logprob_passes * forward, update=n_seq * 3 * forward,
                trained_tokens=n_seq * (P + C), generated_tokens=n_seq * C, logprob_passes=logprob_passes)


def memory(config, p: dict, args: PlanArgs) -> dict:
    """Bytes per GPU (peaks at the max lengths: a micro-batch is padded to its longest sequence).

    Phases: generate (gathered parameters + one call's KV cache) and the update (activations of a
    micro-batch + FSDP's gathered units), on top of the states, the reference and the reserve.
    Autocast: accelerate runs the forward in one torch.autocast region, which caches the bf16 cast
    of every fp32 parameter that requires grad until the region ends (also under no_grad); under
    DDP that is a bf16 copy of the decoder layers and the output layer in every forward, generate's
    decode steps included. Under FSDP the gathered parameters are bf16 already (no cast), except
    v1's root unit, gathered in fp32 for generate: its output layer is cast.
    """
    if args.fsdp_version not in (1, 2):
        raise SystemExit(f"--fsdp_version: 1 or 2, got {args.fsdp_version}")
    if args.logprob_chunk_tokens < 0:
        raise SystemExit("--logprob_chunk_tokens: 0 (no chunks) or more")
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    h, L, I, V = text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size
    kv_width = text.num_key_value_heads * head_dim
    total, g = p["total"], args.n_gpus
    S = args.max_prompt_tokens + args.max_new_tokens
    kv_per_token = 2 * L * kv_width * 2  # K and V, every layer, bf16
    per_token_train = L * h * 2 + (8 * h + 2 * kv_width + 4 * I) * 2  # layer inputs + one layer's working set
    vision_runs = args.image_tokens > 0  # under DDP the vision tower runs only on images

    def logits(sequences: int, new_tokens: int) -> float:
        """One piece of engine.logprob_head: min(chunk, all completion tokens of the micro-batch)."""
        tokens = sequences * new_tokens
        return min(args.logprob_chunk_tokens or tokens, tokens) * V * args.logit_bytes

    def kv_cache(prompts_per_call: int) -> float:
        return kv_per_token * prompts_per_call * args.group_size * S

    out = dict(
        master=4 * total / g, grads=4 * total / g, adam=8 * total / g,  # FSDP full shard, fp32
        ddp_states=16 * total,                                          # the same, unsharded (DDP)
        reference=2 * total,                                            # bf16 copy on every GPU
        # Generate. FSDP2: every unit unsharded in bf16 for the whole rollout. v1: the root unit in
        # fp32 (summon_full_params), its output layer cast to bf16 by autocast, 2 layers in bf16
        # (the one running and the one prefetched).
        gathered=(2 * total if args.fsdp_version == 2
                  else 4 * p["root"] + 2 * p["head"] + 2 * 2 * p["largest_unit"]),
        # The update, FSDP: the root unit stays unsharded in bf16 through forward and backward, with
        # its gradient (bf16, then fp32 for the reduce-scatter), and 2 units in bf16.
        update_gathered=(2 + 2 + 4) * p["root"] + 2 * 2 * p["largest_unit"],
        # DDP: autocast's bf16 copies (decoder layers, output layer; the vision tower when it runs).
        autocast_copies=2 * (p["layers"] + p["head"] + (p["vision"] if vision_runs else 0)),
        kv_cache=kv_cache(args.generation_batch_size),
        kv_cache_mean=kv_per_token * args.generation_batch_size * args.group_size
        * (args.mean_prompt_tokens + args.mean_new_tokens),
        kv_per_token=kv_per_token,
        # Training micro-batch: checkpointed layer inputs (bf16), one layer's recomputed activations
        # (norms, q/k/v, attention out, residuals, gate/up/act/product: ~ 8h + 2kv + 4I values, bf16),
        # and one piece of the completion logits.
        checkpoints=L * args.micro_batch_size * S * h * 2,
        layer_working=args.micro_batch_size * S * (8 * h + 2 * kv_width + 4 * I) * 2,
        logits=logits(args.micro_batch_size, args.max_new_tokens),
        logits_unchunked=args.micro_batch_size * args.max_new_tokens * V * args.logit_bytes,
        logits_mean=logits(args.micro_batch_size, args.mean_new_tokens),
    )
    reserve = args.reserve_gib * GIB
    base_fsdp = out["master"] + out["grads"] + out["adam"] + out["reference"] + reserve
    base_ddp = out["ddp_states"] + out["reference"] + reserve

    def update_fsdp(m: int) -> float:
        return per_token_train * m * S + logits(m, args.max_new_tokens) + out["update_gathered"]

    def update_ddp(m: int) -> float:
        # End of the forward: the layer inputs, autocast's copies and a layer's or a chunk's working
        # set; in the backward the copies are gone (each recomputed layer casts its own, freed after).
        inputs, layer, chunk = L * h * 2 * m * S, (8 * h + 2 * kv_width + 4 * I) * 2 * m * S, logits(m, args.max_new_tokens)
        return inputs + max(out["autocast_copies"] + max(layer, chunk), layer + chunk)

    out["update_fsdp"], out["update_ddp"] = update_fsdp(args.micro_batch_size), update_ddp(args.micro_batch_size)
    out["generate_fsdp"] = out["gathered"] + out["kv_cache"]
    out["generate_ddp"] = out["autocast_copies"] + out["kv_cache"]
    out["peak_fsdp"] = base_fsdp + max(out["generate_fsdp"], out["update_fsdp"])
    out["peak_ddp"] = base_ddp + max(out["generate_ddp"], out["update_ddp"])
    # The largest batch sizes that fit at the max lengths: what a reader changes first.
    budget = args.gpu_memory_gib * GIB

    def largest(fits) -> int:
        n = 0
        while n < 4096 and fits(n + 1):
            n += 1
        return n

    out["fit_generation_fsdp"] = largest(lambda b: base_fsdp + out["gathered"] + kv_cache(b) <= budget)
    out["fit_generation_ddp"] = largest(lambda b: base_ddp + out["autocast_copies"] + kv_cache(b) <= budget)
    out["fit_micro_fsdp"] = largest(lambda m: base_fsdp + update_fsdp(m) <= budget)
    out["fit_micro_ddp"] = largest(lambda m: base_ddp + update_ddp(m) <= budget)
    return out


def step_times(config, p: dict, mem: dict, flops: dict, args: PlanArgs) -> dict:
    """Seconds per step: FLOPs / (GPUs x peak x MFU), and two floors under decoding.

    HF generate keeps finished sequences in the batch until the call's longest one ends, and among
    G x prompts-per-call samples one runaway is enough: so each call is taken to run all
    max_new_tokens decode steps, every step over all its sequences.
    HBM floor: each decode step reads the decoder layers and the output layer once in bf16 and the
    call's whole KV cache so far.
    All-gathers (per GPU, (g - 1)/g of the bf16 bytes at --link_gbs): FSDP2 gathers the whole policy
    once per rollout; FSDP v1 every decoder layer at every decode step (unless that overlaps with
    compute) and the root unit once, in fp32.
    """
    peak = args.peak_tflops * 1e12
    sequences_per_call = args.generation_batch_size * args.group_size
    calls = math.ceil(args.prompts * args.group_size / args.n_gpus / sequences_per_call)
    steps = calls * args.max_new_tokens
    kv_read = mem["kv_per_token"] * sequences_per_call * (args.mean_prompt_tokens + args.max_new_tokens / 2)
    share = (args.n_gpus - 1) / args.n_gpus
    if args.fsdp_version == 2:
        gather_bytes = 2 * p["total"] * share
    else:
        gather_bytes = steps * 2 * p["layers"] * share + 4 * p["root"] * share
    return dict(
        generate=flops["generate"] / (args.n_gpus * peak * args.generate_mfu),
        generate_hbm=steps * (2 * (p["layers"] + p["head"]) + kv_read) / (args.hbm_tbs * 1e12),
        generate_gather=gather_bytes / (args.link_gbs * 1e9), calls=calls,
        logprob=flops["logprob"] / (args.n_gpus * peak * args.train_mfu),
        update=flops["update"] / (args.n_gpus * peak * args.train_mfu),
    )


def fmt_count(n: float) -> str:
    return f"{n:,.0f} ({n / 1e9:.2f}B)"


def plan(args: PlanArgs) -> tuple[list[str], dict]:
    """Rows of the table, as {row name: [value per model]} plus a note per row."""
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; known {list(MODELS)}")
    rows: dict[str, tuple[list[str], str]] = {}

    def add(name: str, values, note: str = ""):
        rows[name] = (list(values), note)

    results = []
    for name in names:
        config = build_config(name)
        p = count_parameters(config)
        f = step_flops(config, p, args)
        m = memory(config, p, args)
        t = step_times(config, p, m, f, args)
        results.append((config, p, f, m, t))
    col = lambda key, src: [r[src][key] for r in results]  # noqa: E731
    gib = lambda values: [f"{v / GIB:.1f}" for v in values]  # noqa: E731
    P, F, M, T = 1, 2, 3, 4

    add("**Parameters** (exact, meta device)", ["" for _ in names])
    add("parameters", [fmt_count(v) for v in col("total", P)], "tied output layer counted once (3B)")
    add("text decoder layers", [fmt_count(v) for v in col("layers", P)])
    add("embedding / output layer", [f"{r[P]['embedding'] / 1e6:.0f}M / " + ("tied" if r[P]["tied"] else f"{r[P]['head'] / 1e6:.0f}M")
                                     for r in results])
    add("vision tower", [fmt_count(v) for v in col("vision", P)])
    fsdp = "FSDP2" if args.fsdp_version == 2 else "FSDP v1"
    chunk = args.logprob_chunk_tokens
    add(f"**Memory per GPU, GiB** ({args.n_gpus} x {args.gpu}, {args.gpu_memory_gib:g} GiB)", ["" for _ in names])
    add("fp32 master weights (FSDP full shard)", gib(col("master", M)), "4 bytes x N / GPUs")
    add("fp32 gradients (FSDP)", gib(col("grads", M)), "4 bytes x N / GPUs")
    add("Adam states m, v (FSDP)", gib(col("adam", M)), "8 bytes x N / GPUs")
    add("reference model (bf16, every GPU)", gib(col("reference", M)), "grpo.py loads it unsharded")
    add(f"generate: gathered params ({fsdp})", gib(col("gathered", M)),
        "whole policy in bf16, 2 bytes x N, once per rollout" if args.fsdp_version == 2
        else "root unit fp32 + its output layer cast to bf16 + 2 layers bf16")
    add(f"KV cache per generate call ({args.generation_batch_size} x {args.group_size} sequences, max lengths)",
        gib(col("kv_cache", M)), f"{args.max_prompt_tokens} + {args.max_new_tokens} tokens, bf16")
    add("KV cache per generate call, mean lengths", gib(col("kv_cache_mean", M)),
        f"{args.mean_prompt_tokens} + {args.mean_new_tokens} tokens")
    add(f"activations: checkpointed layer inputs ({args.micro_batch_size} seqs, max lengths)",
        gib(col("checkpoints", M)), "bf16, layers x tokens x hidden")
    add("activations: one layer recomputed", gib(col("layer_working", M)), "~(8h + 2kv + 4I) bf16 values per token")
    if chunk and chunk < args.micro_batch_size * args.max_new_tokens:
        add(f"completion logits, one chunk of {chunk} tokens", gib(col("logits", M)),
            f"{args.logit_bytes} bytes per vocab entry; all {args.micro_batch_size} x {args.max_new_tokens} at once: "
            + " / ".join(gib(col("logits_unchunked", M))))
    else:
        add(f"completion logits ({args.micro_batch_size} x {args.max_new_tokens} tokens)", gib(col("logits", M)),
            f"{args.logit_bytes} bytes per vocab entry")
        add(f"completion logits, mean length ({args.mean_new_tokens})", gib(col("logits_mean", M)))
    add(f"update: gathered units ({fsdp})", gib(col("update_gathered", M)),
        "root bf16 + its gradient bf16 and fp32, 2 layers bf16")
    add("autocast's bf16 weight copies (DDP, every forward)", gib(col("autocast_copies", M)),
        "2 bytes x (decoder layers + output layer)")
    fits = lambda v: f"{v / GIB:.1f}" + (" (fits)" if v / GIB <= args.gpu_memory_gib else " (**does not fit**)")  # noqa: E731
    add(f"peak, {fsdp} full shard (configs/fsdp.yaml" + (")" if args.fsdp_version == 2 else ", fsdp_version: 1)"), [fits(v) for v in col("peak_fsdp", M)],
        f"states + reference + {args.reserve_gib:g} reserved + max(generate, update)")
    add(f"  {fsdp}: generate / update", [f"{r[M]['generate_fsdp'] / GIB:.1f} / {r[M]['update_fsdp'] / GIB:.1f}"
                                        for r in results])
    add("peak, DDP (configs/ddp.yaml)", [fits(v) for v in col("peak_ddp", M)],
        "states 16 bytes x N, unsharded; autocast's copies in both phases")
    add("  DDP: generate / update", [f"{r[M]['generate_ddp'] / GIB:.1f} / {r[M]['update_ddp'] / GIB:.1f}"
                                        for r in results])
    add(f"largest --generation_batch_size that fits, {fsdp} / DDP",
        [f"{r[M]['fit_generation_fsdp']} / {r[M]['fit_generation_ddp']}" for r in results],
        f"prompts per call, x {args.group_size} sequences, max lengths")
    add(f"largest --micro_batch_size that fits, {fsdp} / DDP",
        [f"{r[M]['fit_micro_fsdp']} / {r[M]['fit_micro_ddp']}" for r in results], "sequences, max lengths")
    add(f"**FLOPs per step** (mean lengths {args.mean_prompt_tokens} + {args.mean_new_tokens})", ["" for _ in names])
    pf = lambda values: [f"{v / 1e15:,.1f} PFLOP" for v in values]  # noqa: E731
    add(f"generation ({args.prompts} x {args.group_size} samples)", pf(col("generate", F)),
        "2N per token + attention; prompts prefilled G times")
    add("log-prob passes (old + reference)", pf(col("logprob", F)), "2N per token + attention")
    add("update (forward + backward)", pf(col("update", F)), "6N per trained token + attention")
    add("all FLOPs of the step", pf([r[F]["generate"] + r[F]["logprob"] + r[F]["update"] for r in results]))
    add(f"**Time per step** ({args.peak_tflops:g} TFLOP/s peak per GPU)", ["" for _ in names])
    sec = lambda values: [f"{v:,.0f} s" for v in values]  # noqa: E731
    add(f"generation at MFU {args.generate_mfu:g}", sec(col("generate", T)))
    add("  floor: HBM reads of decoding", sec(col("generate_hbm", T)),
        f"{results[0][T]['calls']} calls/GPU x {args.max_new_tokens} decode steps: weights + KV cache")
    if args.fsdp_version == 2:
        add("  FSDP2: all-gather of the whole policy", [f"{v:.2f} s" for v in col("generate_gather", T)],
            f"once per rollout, bf16, at {args.link_gbs:g} GB/s")
    else:
        add("  floor: FSDP v1 all-gathers in decoding", sec(col("generate_gather", T)),
            f"every layer per decode step at {args.link_gbs:g} GB/s, if not overlapped")
    add(f"log-prob passes at MFU {args.train_mfu:g}", sec(col("logprob", T)))
    add(f"update at MFU {args.train_mfu:g}", sec(col("update", T)))
    once = args.fsdp_version == 2  # v1's per-step gathers: taken as overlapped here, waited on below
    totals = [r[T]["generate"] + once * r[T]["generate_gather"] + r[T]["logprob"] + r[T]["update"] for r in results]
    add("step (at the MFUs)", sec(totals), "FSDP2: + the one all-gather" if args.fsdp_version == 2 else
        "decoding's all-gathers taken as overlapped")
    add(f"run of {args.steps} steps", [f"{v * args.steps / 3600:,.1f} h" for v in totals])
    if args.fsdp_version == 1:
        gathered = [max(r[T]["generate"], r[T]["generate_gather"]) + r[T]["logprob"] + r[T]["update"]
                    for r in results]
        add("step, FSDP v1, decoding waiting on its all-gathers", sec(gathered),
            "the gather floor instead of generation at its MFU")
        add(f"run of {args.steps} steps, FSDP v1, so", [f"{v * args.steps / 3600:,.1f} h" for v in gathered])
    return names, rows


def markdown(names: list[str], rows: dict) -> str:
    lines = ["| | " + " | ".join(f"Qwen2.5-VL-{n}" for n in names) + " | how |",
             "|---|" + "---|" * len(names) + "---|"]
    for name, (values, note) in rows.items():
        lines.append(f"| {name} | " + " | ".join(values) + f" | {note} |")
    return "\n".join(lines)


def main(argv=None):
    (args,) = HfArgumentParser(PlanArgs).parse_args_into_dataclasses(argv)
    names, rows = plan(args)
    print(markdown(names, rows))
    print()
    print("Assumptions (flags of benchmarks/plan.py): " + ", ".join(
        f"{k}={v}" for k, v in vars(args).items() if k != "models"))


if __name__ == "__main__":
    main()
