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
logits (`logits_to_keep`), gradient checkpointing recomputes each layer's forward.
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
    """Bytes per GPU (peaks at the max lengths: a micro-batch is padded to its longest sequence)."""
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    h, L, I, V = text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size
    kv_width = text.num_key_value_heads * head_dim
    total, g = p["total"], args.n_gpus
    S = args.max_prompt_tokens + args.max_new_tokens
    kv_per_token = 2 * L * kv_width * 2  # K and V, every layer, bf16
    seqs_per_call = args.generation_batch_size * args.group_size
    tokens = args.micro_batch_size * S
    out = dict(
        master=4 * total / g, grads=4 * total / g, adam=8 * total / g,  # FSDP full shard, fp32
        ddp_states=16 * total,                                          # the same, unsharded (DDP)
        reference=2 * total,                                            # bf16 copy on every GPU
        # generate under FSDP v1: the root unit gathered in fp32 (summon_full_params), one layer in bf16
        gathered=4 * p["root"] + 2 * 2 * p["largest_unit"],
        kv_cache=kv_per_token * seqs_per_call * S,
        kv_cache_mean=kv_per_token * seqs_per_call * (args.mean_prompt_tokens + args.mean_new_tokens),
        kv_per_token=kv_per_token,
        # Training micro-batch: checkpointed layer inputs (bf16), one layer's recomputed activations
        # (norms, q/k/v, attention out, residuals, gate/up/act/product: ~ 8h + 2kv + 4I values, bf16),
        # and the completion logits.
        checkpoints=L * tokens * h * 2,
        layer_working=tokens * (8 * h + 2 * kv_width + 4 * I) * 2,
        logits=args.micro_batch_size * args.max_new_tokens * V * args.logit_bytes,
        logits_mean=args.micro_batch_size * args.mean_new_tokens * V * args.logit_bytes,
    )
    reserve = args.reserve_gib * GIB
    base_fsdp = out["master"] + out["grads"] + out["adam"] + out["reference"] + reserve
    base_ddp = out["ddp_states"] + out["reference"] + reserve
    train_peak = out["checkpoints"] + out["layer_working"] + out["logits"]
    out["peak_fsdp"] = base_fsdp + max(out["gathered"] + out["kv_cache"], train_peak)
    out["peak_ddp"] = base_ddp + max(out["kv_cache"], train_peak)
    # The largest batch sizes that fit at the max lengths: what a reader changes first.
    per_prompt_kv = kv_per_token * args.group_size * S
    per_sequence = (L * h * 2 + (8 * h + 2 * kv_width + 4 * I) * 2) * S + args.max_new_tokens * V * args.logit_bytes
    budget = args.gpu_memory_gib * GIB
    out["fit_generation_fsdp"] = max(0, int((budget - base_fsdp - out["gathered"]) // per_prompt_kv))
    out["fit_generation_ddp"] = max(0, int((budget - base_ddp) // per_prompt_kv))
    out["fit_micro_fsdp"] = max(0, int((budget - base_fsdp) // per_sequence))
    out["fit_micro_ddp"] = max(0, int((budget - base_ddp) // per_sequence))
    return out


def step_times(config, p: dict, mem: dict, flops: dict, args: PlanArgs) -> dict:
    """Seconds per step: FLOPs / (GPUs x peak x MFU), and two floors under decoding.

    HF generate keeps finished sequences in the batch until the call's longest one ends, and among
    G x prompts-per-call samples one runaway is enough: so each call is taken to run all
    max_new_tokens decode steps, every step over all its sequences.
    HBM floor: each decode step reads the decoder layers and the output layer once in bf16 and the
    call's whole KV cache so far.
    FSDP floor: each decode step all-gathers every decoder layer ((g - 1)/g of its bf16 bytes per
    GPU), unless that overlaps with compute.
    """
    peak = args.peak_tflops * 1e12
    sequences_per_call = args.generation_batch_size * args.group_size
    calls = math.ceil(args.prompts * args.group_size / args.n_gpus / sequences_per_call)
    steps = calls * args.max_new_tokens
    kv_read = mem["kv_per_token"] * sequences_per_call * (args.mean_prompt_tokens + args.max_new_tokens / 2)
    link = 2 * p["layers"] * (args.n_gpus - 1) / args.n_gpus
    return dict(
        generate=flops["generate"] / (args.n_gpus * peak * args.generate_mfu),
        generate_hbm=steps * (2 * (p["layers"] + p["head"]) + kv_read) / (args.hbm_tbs * 1e12),
        generate_gather=steps * link / (args.link_gbs * 1e9), calls=calls,
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
    add(f"**Memory per GPU, GiB** ({args.n_gpus} x {args.gpu}, {args.gpu_memory_gib:g} GiB)", ["" for _ in names])
    add("fp32 master weights (FSDP full shard)", gib(col("master", M)), "4 bytes x N / GPUs")
    add("fp32 gradients (FSDP)", gib(col("grads", M)), "4 bytes x N / GPUs")
    add("Adam states m, v (FSDP)", gib(col("adam", M)), "8 bytes x N / GPUs")
    add("reference model (bf16, every GPU)", gib(col("reference", M)), "grpo.py loads it unsharded")
    add("generate: gathered params (FSDP)", gib(col("gathered", M)), "root unit fp32 + 2 layers bf16")
    add(f"KV cache per generate call ({args.generation_batch_size} x {args.group_size} sequences, max lengths)",
        gib(col("kv_cache", M)), f"{args.max_prompt_tokens} + {args.max_new_tokens} tokens, bf16")
    add("KV cache per generate call, mean lengths", gib(col("kv_cache_mean", M)),
        f"{args.mean_prompt_tokens} + {args.mean_new_tokens} tokens")
    add(f"activations: checkpointed layer inputs ({args.micro_batch_size} seqs, max lengths)",
        gib(col("checkpoints", M)), "bf16, layers x tokens x hidden")
    add("activations: one layer recomputed", gib(col("layer_working", M)), "~(8h + 2kv + 4I) bf16 values per token")
    add(f"completion logits ({args.micro_batch_size} x {args.max_new_tokens} tokens)", gib(col("logits", M)),
        f"{args.logit_bytes} bytes per vocab entry")
    add(f"completion logits, mean length ({args.mean_new_tokens})", gib(col("logits_mean", M)))
    fits = lambda v: f"{v / GIB:.1f}" + (" (fits)" if v / GIB <= args.gpu_memory_gib else " (**does not fit**)")  # noqa: E731
    add("peak, FSDP full shard (configs/fsdp.yaml)", [fits(v) for v in col("peak_fsdp", M)],
        f"states + reference + {args.reserve_gib:g} reserved + max(generate, update)")
    add("peak, DDP (configs/ddp.yaml)", [fits(v) for v in col("peak_ddp", M)], "states 16 bytes x N, unsharded")
    add("largest --generation_batch_size that fits, FSDP / DDP",
        [f"{r[M]['fit_generation_fsdp']} / {r[M]['fit_generation_ddp']}" for r in results],
        f"prompts per call, x {args.group_size} sequences, max lengths")
    add("largest --micro_batch_size that fits, FSDP / DDP",
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
    add("  floor: FSDP all-gathers in decoding", sec(col("generate_gather", T)),
        f"every layer per decode step at {args.link_gbs:g} GB/s, if not overlapped")
    add(f"log-prob passes at MFU {args.train_mfu:g}", sec(col("logprob", T)))
    add(f"update at MFU {args.train_mfu:g}", sec(col("update", T)))
    totals = [r[T]["generate"] + r[T]["logprob"] + r[T]["update"] for r in results]
    add("step (at the MFUs)", sec(totals))
    add(f"run of {args.steps} steps", [f"{v * args.steps / 3600:,.1f} h" for v in totals])
    gathered = [r[T]["generate_gather"] + r[T]["logprob"] + r[T]["update"] for r in results]
    add("step, FSDP, decoding waiting on its all-gathers", sec(gathered),
        "the gather floor instead of generation at its MFU")
    add(f"run of {args.steps} steps, FSDP, so", [f"{v * args.steps / 3600:,.1f} h" for v in gathered])
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
