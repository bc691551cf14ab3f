"""Benchmark (not a test): a GRPO step of grpo.py against one of TRL's GRPOTrainer, same settings, on CPU.

    python benchmarks/grpo_vs_trl.py --trl_python /work/trl-venv/bin/python            # tiny, 2 rounds
    python benchmarks/grpo_vs_trl.py --trl_python ... --sizes tiny,small,medium --rounds 3 --steps 4

What is compared: the time of one GRPO step (rollout, rewards, log-prob passes, optimizer step) of
grpo.py (with --share_prompt True and False) and of TRL's GRPOTrainer (1.16, plain transformers
`generate`, no vLLM), at identical settings:
- B = 16 prompts x G = 8 samples per step, 64 new tokens, temperature 1.0, top_p 1.0, no top_k, no
  repetition penalty, the never-generate ids of reward.py suppressed in both;
- one optimizer step per rollout: grpo.py --mini_batch_size 16 --micro_batch_size 32 (4 micro-batches
  of 32 sequences); TRL per_device_train_batch_size 32 (sequences), gradient_accumulation_steps 4,
  steps_per_generation 4 (one generation of 128 sequences per optimizer step), num_iterations 1; so
  neither computes log-probs of the sampling policy (the update is on-policy);
- beta 0.01 with a frozen reference model, clip 0.2, token-mean loss (TRL's "dapo"), rewards scaled
  by the group's std, AdamW lr 1e-6 constant, weight decay 0.01, grad norm 1.0, fp32, no gradient
  checkpointing, one generate call for the whole rollout (grpo.py --generation_batch_size 16);
- the same randomly initialised Qwen2.5-VL folder (toy.py model --size tiny/small, and "medium", a
  ~4.5M-parameter one built here from small's config and processor), loaded by both as
  Qwen2_5_VLForConditionalGeneration; the same 256 toy prompts, half with an image (toy.py data,
  128 ToyLesion rows and 128 text rows, interleaved); the same prompts at each step: TRL reads the
  rows in grpo.py's epoch-0 permutation with its own shuffle off;
- reward: reward.reward(completion, answer_label, answer) in both; prompts: reward.build_prompt_text
  in TRL's conversational format with an `images` column (TRL puts the images before the text, as
  reward.build_messages does); the driver checks that the rendered chat texts equal reward.chat_prompts.

How: each run is a fresh process with OMP_NUM_THREADS=--threads (and torch.set_num_threads;
OMP_WAIT_POLICY unset unless --omp_wait_policy), run in turn (grpo share, grpo no-share, trl, grpo
share, ...) for --rounds rounds, each --steps steps. The first step of every run is discarded (warm-up).
grpo.py is run as its command line and its step time is time_generate + time_score + time_logprob +
time_update of OUTPUT_DIR/metrics.jsonl; TRL runs in its own venv (--trl_python; requirements-trl.txt) through the
driver at the bottom of this file, which times each optimizer step with a TrainerCallback (on_step_begin
to on_step_end: generation, scoring, the reference pass, 4 forward/backward passes, the optimizer step)
and its `_generate` call. Reported: the median step time of each (over all kept steps of all rounds),
the ratio TRL / grpo, completion tokens per second of step time, and the generation time. A markdown
table is printed and everything (settings, every step) is written to --output_json.

A random model samples random tokens, so nearly every completion runs to the 64 tokens in both.
"""

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

ROOT = Path(__file__).resolve().parents[1]

# A ~4.5M-parameter model, built from small's folder (toy.py has tiny ~0.2M and small ~1.6M):
# text hidden, layers, heads, kv heads, mlp, mrope_section (sums to head_dim / 2).
MEDIUM_TEXT = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=640, mrope_section=[4, 6, 6])


@dataclass
class BenchArgs:
    trl_python: str | None = field(default=None, metadata={
        "help": "Python of the venv with TRL (requirements-trl.txt). None: only grpo.py's half runs."})
    sizes: str = field(default="tiny", metadata={"help": "Comma-separated: tiny, small (toy.py), medium (~4.5M)."})
    share_prompt: str = field(default="True,False", metadata={"help": "grpo.py --share_prompt values to run."})
    rounds: int = field(default=2, metadata={"help": "Alternations of (grpo per share_prompt value, trl)."})
    steps: int = field(default=3, metadata={"help": "Steps per run; the first is discarded."})
    rollout_batch_size: int = 16
    group_size: int = 8
    max_new_tokens: int = 64
    micro_batch_size: int = field(default=32, metadata={"help": "Sequences per forward (both)."})
    beta: float = 0.01
    threads: int = 2
    omp_wait_policy: str = field(default="", metadata={
        "help": "OMP_WAIT_POLICY of every run: empty leaves OpenMP's default (threads spin a while before "
                "sleeping, what a user gets); PASSIVE makes waiting threads sleep at once (the demo's setting, "
                "for a machine shared with other jobs), which costs small models a wake-up per parallel op."})
    seed: int = 42
    n_prompts: int = field(default=256, metadata={"help": "Prompts in the data set, half with an image."})
    work_dir: str = "/tmp/grpo_vs_trl"
    output_json: str | None = field(default=None, metadata={"help": "Default: WORK_DIR/results.json."})
    timeout: int = field(default=3600, metadata={"help": "Seconds per run before it is stopped."})


# ---------------------------------------------------------------------------------------------
# Inputs: the toy data (half images) and the model folders
# ---------------------------------------------------------------------------------------------


def run(cmd: list[str], threads: int, timeout: int, wait_policy: str = "") -> str:
    """A command in a fresh process with `threads` CPU threads, from the repository root; its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    env.pop("OMP_WAIT_POLICY", None)  # unset: OpenMP's default, unless asked for
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def make_data(args: BenchArgs, work: Path) -> Path:
    """n_prompts toy rows, image and text rows in turn (toy.py cycles 2 text families and 1 image one)."""
    out = work / f"data_{args.n_prompts}"
    if out.exists():
        return out
    half = args.n_prompts // 2
    raw = work / "data_raw"
    if not raw.exists():
        run([sys.executable, "toy.py", "data", "--output_dir", str(raw), "--n_sft", "3", "--n_train",
             str(3 * half), "--n_validation", "3", "--n_test", "3"], args.threads, args.timeout)
    import datasets

    train = datasets.load_from_disk(str(raw))["train"]
    names = train["dataset_name"]
    image_rows = [i for i, n in enumerate(names) if n == "ToyLesion"][:half]
    text_rows = [i for i, n in enumerate(names) if n != "ToyLesion"][:half]
    order = [i for pair in zip(image_rows, text_rows) for i in pair]
    datasets.DatasetDict({"train": train.select(order)}).save_to_disk(str(out))
    return out


def build_medium(small: Path, out: Path) -> None:
    """small's processor and generation config around a bigger random text model (MEDIUM_TEXT)."""
    import torch
    from transformers import AutoProcessor, GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_pretrained(small)
    text = dict(MEDIUM_TEXT)
    config.text_config.rope_parameters["mrope_section"] = text.pop("mrope_section")
    for key, value in text.items():
        setattr(config.text_config, key, value)
    config.text_config.layer_types = ["full_attention"] * MEDIUM_TEXT["num_hidden_layers"]
    config.vision_config.out_hidden_size = MEDIUM_TEXT["hidden_size"]
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(small)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(small).save_pretrained(out)


def make_model(size: str, args: BenchArgs, work: Path) -> Path:
    out = work / f"model_{size}"
    if out.exists():
        return out
    if size == "medium":
        build_medium(make_model("small", args, work), out)
    else:
        run([sys.executable, "toy.py", "model", "--output_dir", str(out), "--size", size], args.threads, args.timeout)
    return out


def n_parameters(model: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# ---------------------------------------------------------------------------------------------
# One run of each: a fresh process, its steps after the first
# ---------------------------------------------------------------------------------------------


def run_grpo(model: Path, data: Path, out: Path, share: bool, args: BenchArgs) -> list[dict]:
    """grpo.py as its command line; per step: time (its four phases), generation time, tokens."""
    shutil.rmtree(out, ignore_errors=True)  # grpo.py refuses a finished run's folder
    B = args.rollout_batch_size
    run([sys.executable, "grpo.py", "--model", str(model), "--data", str(data), "--output_dir", str(out),
         "--rollout_batch_size", str(B), "--group_size", str(args.group_size), "--mini_batch_size", str(B),
         "--micro_batch_size", str(args.micro_batch_size), "--generation_batch_size", str(B),
         "--max_new_tokens", str(args.max_new_tokens), "--temperature", "1.0", "--top_p", "1.0",
         "--beta", str(args.beta), "--learning_rate", "1e-6", "--lr_scheduler_type", "constant",
         "--mixed_precision", "no", "--gradient_checkpointing", "False", "--share_prompt", str(share),
         "--seed", str(args.seed), "--max_steps", str(args.steps), "--save_steps", "0", "--save_final", "False"],
        args.threads, args.timeout, args.omp_wait_policy)
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    n = B * args.group_size
    return [{"step": r["step"], "time": sum(r[f"time_{phase}"] for phase in ("generate", "score", "logprob", "update")),
             "time_generate": r["time_generate"], "completion_tokens": r["completion_length"] * n}
            for r in records]


def run_trl(model: Path, data: Path, out: Path, args: BenchArgs) -> list[dict]:
    """The TRL driver (bottom of this file) in the TRL venv; it writes one line per optimizer step."""
    shutil.rmtree(out, ignore_errors=True)
    run([args.trl_python, str(Path(__file__).resolve()), "trl-driver", "--model", str(model), "--data", str(data),
         "--output_dir", str(out), "--rollout_batch_size", str(args.rollout_batch_size), "--group_size",
         str(args.group_size), "--micro_batch_size", str(args.micro_batch_size), "--max_new_tokens",
         str(args.max_new_tokens), "--beta", str(args.beta), "--steps", str(args.steps), "--seed", str(args.seed),
         "--threads", str(args.threads)], args.threads, args.timeout, args.omp_wait_policy)
    with open(out / "steps.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def summary(steps: list[dict]) -> dict:
    """Medians over the kept steps (the first of each run discarded by the caller)."""
    time_ = statistics.median(s["time"] for s in steps)
    return {"steps": len(steps), "median_step_s": time_,
            "median_generate_s": statistics.median(s["time_generate"] for s in steps),
            "completion_tokens_per_s": statistics.median(s["completion_tokens"] / s["time"] for s in steps)}


def table(results: dict, args: BenchArgs) -> str:
    lines = [f"B={args.rollout_batch_size} prompts x G={args.group_size}, {args.max_new_tokens} new tokens, "
             f"beta {args.beta}, one optimizer step per rollout (micro-batch {args.micro_batch_size}), fp32, "
             f"{args.threads} CPU threads; {args.rounds} rounds of {args.steps} steps, first step of each run "
             f"discarded; medians",
             "",
             "| model | params | run | kept steps | s/step | generate s | completion tok/s | TRL / this |",
             "|---|---|---|---|---|---|---|---|"]
    for size, res in results.items():
        trl = res["runs"].get("trl")
        for name, s in res["runs"].items():
            ratio = f"{trl['median_step_s'] / s['median_step_s']:.2f}" if trl and name != "trl" else ""
            lines.append(f"| {size} | {res['params'] / 1e6:.2f}M | {name} | {s['steps']} | {s['median_step_s']:.2f} | "
                         f"{s['median_generate_s']:.2f} | {s['completion_tokens_per_s']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    (args,) = HfArgumentParser(BenchArgs).parse_args_into_dataclasses(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(args, work)
    shares = [s.strip() == "True" for s in args.share_prompt.split(",") if s.strip()]
    names = [f"grpo share_prompt={s}" for s in shares] + (["trl"] if args.trl_python else [])
    if not args.trl_python:
        print("no --trl_python: only grpo.py's runs", file=sys.stderr)
    results = {}
    for size in args.sizes.split(","):
        model = make_model(size, args, work)
        steps = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names:  # grpo (each share_prompt value), trl, grpo, trl, ...
                out = work / f"run_{size}_{name.replace(' ', '_').replace('=', '')}"
                started = time.perf_counter()
                if name == "trl":
                    records = run_trl(model, data, out, args)
                else:
                    records = run_grpo(model, data, out, "True" in name, args)
                print(f"{size} round {r + 1} {name}: {len(records)} steps, {time.perf_counter() - started:.0f} s "
                      f"wall; step times " + ", ".join(f"{s['time']:.2f}" for s in records), file=sys.stderr)
                steps[name] += [dict(s, round=r + 1) for s in records[1:]]  # the first step warms up
        results[size] = {"model": str(model), "params": n_parameters(model), "all_steps": steps,
                         "runs": {name: summary(s) for name, s in steps.items()}}
    text = table(results, args)
    print(text)
    path = Path(args.output_json or work / "results.json")
    with open(path, "w") as f:
        json.dump({"settings": asdict(args), "results": results, "table": text}, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The TRL driver: runs in the TRL venv (`python benchmarks/grpo_vs_trl.py trl-driver ...`)
# ---------------------------------------------------------------------------------------------


@dataclass
class DriverArgs:
    model: str
    data: str
    output_dir: str
    rollout_batch_size: int = 16
    group_size: int = 8
    micro_batch_size: int = 32
    max_new_tokens: int = 64
    beta: float = 0.01
    steps: int = 3
    seed: int = 42
    threads: int = 2
    # benchmarks/gpu_check.py's step: on a GPU bf16 autocast over fp32 weights, and gradient
    # checkpointing, as grpo.py runs there by default.
    cpu: bool = True
    bf16: bool = False
    gradient_checkpointing: bool = False


def trl_dataset(args: DriverArgs, processor):
    """The schema rows in TRL's conversational format, in grpo.py's epoch-0 order (so step k trains on
    grpo.py's step-k prompts): `prompt` (one user turn, the text of reward.build_prompt_text), `images`
    (TRL inserts them before the text, as reward.build_messages does), and the reward's columns."""
    import torch
    from trl.data_utils import prepare_multimodal_messages

    import reward
    import runtime

    rows = runtime.load_split(args.data, "train")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))  # grpo.step_rows
    rows = rows.select(order.tolist())

    def convert(row):
        row = reward.check_row(row, runtime.data_dir(args.data))
        return {"prompt": [{"role": "user", "content": reward.build_prompt_text(row)}],
                "images": row["images"] or []}

    dataset = rows.map(convert, remove_columns=[c for c in rows.column_names
                                                 if c not in ("answer_label", "answer", "images")])
    for i in range(min(4, len(dataset))):  # TRL's rendering of a prompt is grpo.py's (reward.chat_prompts)
        row = dataset[i]
        text = processor.apply_chat_template(prepare_multimodal_messages(row["prompt"], images=row["images"]),
                                             add_generation_prompt=True, tokenize=False)
        expected, _ = reward.chat_prompts(processor, [reward.check_row(rows[i], runtime.data_dir(args.data))])
        if text != expected[0]:
            raise AssertionError(f"TRL renders a prompt differently:\n{text!r}\nvs grpo.py's\n{expected[0]!r}")
    return dataset


def no_empty_images(module, args, kwargs):
    """A forward pre-hook on Qwen2_5_VLModel: a batch slice without any image gets no pixel_values.

    TRL 1.16 slices the rollout's pixel_values by sequence (its reference pass in chunks of
    per_device_train_batch_size, then each micro-batch), and gives a slice of text-only sequences an
    empty pixel_values tensor instead of None; Qwen2.5-VL's vision tower then fails ("torch.cat():
    expected a non-empty list of Tensors"). Dropping the empty tensors changes nothing computed.
    """
    pixel_values = kwargs.get("pixel_values")
    if pixel_values is not None and pixel_values.numel() == 0:
        kwargs = {**kwargs, "pixel_values": None, "image_grid_thw": None}
    return args, kwargs


def trl_driver(argv):
    (args,) = HfArgumentParser(DriverArgs).parse_args_into_dataclasses(argv)
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import reward

    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.model)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    never_ids = reward.never_generate_ids(processor.tokenizer)
    sequences = args.rollout_batch_size * args.group_size
    accumulation = sequences // args.micro_batch_size
    config = GRPOConfig(
        output_dir=args.output_dir, use_cpu=args.cpu, bf16=args.bf16, fp16=False, seed=args.seed, max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation, num_iterations=1, num_generations=args.group_size,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, generation_kwargs={"suppress_tokens": never_ids},
        beta=args.beta, epsilon=0.2, loss_type="dapo", scale_rewards="group", use_bias_correction_kl=False,
        learning_rate=1e-6, lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0,
        optim="adamw_torch", gradient_checkpointing=args.gradient_checkpointing, shuffle_dataset=False,
        remove_unused_columns=False,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=True,
    )

    def correctness(completions, answer_label, answer, **kwargs):
        return [reward.reward(c[0]["content"], label, text) for c, label, text in zip(completions, answer_label, answer)]

    trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=config,
                          train_dataset=trl_dataset(args, processor), processing_class=processor)

    generate_times = []
    original_generate = trainer._generate

    def timed_generate(prompts):
        started = time.perf_counter()
        result = list(original_generate(prompts))
        generate_times.append(time.perf_counter() - started)
        # TRL 1.16 gives a text-only prompt of a batch with images None for its images, and then
        # fails in processor(images=[[image], None, ...]) ("only a single or a list of entries is
        # supported but got type=<class 'NoneType'>"): an empty list is what the processor takes.
        if result[6] is not None:
            result[6] = [images or [] for images in result[6]]
        return tuple(result)

    trainer._generate = timed_generate
    for m in (trainer.model, trainer.ref_model):
        if m is not None:
            m.model.register_forward_pre_hook(no_empty_images, with_kwargs=True)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.start = [], None

        def on_step_begin(self, args_, state, control, **kwargs):
            self.start, self.n_generate = time.perf_counter(), len(generate_times)

        def on_step_end(self, args_, state, control, **kwargs):
            self.steps.append({"step": state.global_step, "time": time.perf_counter() - self.start,
                               "time_generate": sum(generate_times[self.n_generate:])})

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history
               if "completions/mean_length" in log]
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "steps.jsonl"), "w") as f:
        for step, length in zip(timer.steps, lengths):
            f.write(json.dumps({**step, "completion_tokens": length * sequences}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["trl-driver"]:
        trl_driver(sys.argv[2:])
    else:
        main()
