"""The reliability contract of docs/method.md section 10 where it takes whole runs: one writer per
run folder, checkpoints verified at resume, a full disk, SIGTERM, nonsense refused before any work,
prompts beyond the model's context, and named errors printed as one line. Each case checks the exit
status, the message and what is left on disk (the README's fault table lists them)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

import evaluate
import grpo
import runtime
import sft
from conftest import ROOT, run_env

SFT = ["--split", "sft", "--learning_rate", "3e-3", "--global_batch_size", "4", "--micro_batch_size", "4"]


def run_sft(model, data, out, *flags):
    return sft.main(["--model", model, "--data", data, "--output_dir", str(out), *SFT, *map(str, flags)])


def script(name, *args, env=None, **popen):
    """A stage as a user starts it: `python NAME.py ARGS` (runtime.run_main), one thread, offline."""
    return subprocess.Popen([sys.executable, f"{name}.py", *map(str, args)], cwd=ROOT, env=env or run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def wait_for(condition, proc, what: str, seconds: float = 120):
    start = time.time()
    while not condition():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()}"
        assert time.time() - start < seconds, f"no {what} after {seconds} s"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------------


def test_a_second_run_is_refused_and_a_killed_holder_blocks_nothing(tiny_model_dir, toy_data_dir, tmp_path,
                                                                    capsys):
    """Two `--resume latest` runs of one folder (a re-queued job beside its old self): the second
    exits 1 with one line naming the folder and the holder's pid, and writes nothing. The holder is
    frozen (SIGSTOP) once it has claimed the folder, so the order is certain, then killed with -9:
    the next run takes the folder over and ends with one metrics line per step, in order."""
    out = tmp_path / "run"
    flags = ["--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", out, *SFT,
             "--max_steps", "6", "--save_steps", "0", "--resume", "latest"]
    holder = script("sft", *flags)
    try:
        wait_for(lambda: (out / runtime.RUN_FILE).exists(), holder, "its claim")
        os.kill(holder.pid, signal.SIGSTOP)
        before = sorted(p.name for p in out.iterdir())
        second = script("sft", *flags)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1
        assert err.strip().splitlines()[-1:] == [
            f"sft.py: error: {out} is in use by another run (pid {holder.pid}: {sys.executable} sft.py "
            f"{' '.join(map(str, flags))}). Wait for it to end, or choose another --output_dir."]
        assert "Traceback" not in err and sorted(p.name for p in out.iterdir()) == before
    finally:
        holder.kill()  # -9, frozen mid-run: its lock dies with it
        holder.wait()
    sft.main(list(map(str, flags)))
    assert [m["step"] for m in lines_of(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# Checkpoints you can trust
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["model.safetensors", "training_state/optimizer.bin"])
def test_a_damaged_checkpoint_is_named_and_passed_over(damaged, tiny_model_dir, toy_data_dir, tmp_path, capsys):
    """Every save records each file's size and SHA-256 (checksums.json); a resume checks them. A
    truncated file in checkpoint-4 (as a full disk or a killed copy leaves it): --resume latest names
    it and resumes from checkpoint-2, ending with the uninterrupted run's weights; --resume pointing
    at it is a named error."""
    flags = ["--max_steps", "6", "--save_steps", "2"]
    run_sft(tiny_model_dir, toy_data_dir, tmp_path / "straight", *flags)
    stopped = tmp_path / "stopped"
    run_sft(tiny_model_dir, toy_data_dir, stopped, *flags)
    for name in ("final", "checkpoint-6"):  # as if killed after saving checkpoint-4
        shutil.rmtree(stopped / name)
    recorded = json.loads((stopped / "checkpoint-4" / runtime.CHECKSUMS).read_text())
    assert set(recorded) >= {"model.safetensors", "config.json", "resume_state.json", damaged}
    target = stopped / "checkpoint-4" / damaged
    size = target.stat().st_size
    with open(target, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=rf"--resume {stopped}/checkpoint-4: the checkpoint is damaged "
                                         rf"\({damaged} has {size // 2} bytes, {size} when saved\)"):
        run_sft(tiny_model_dir, toy_data_dir, stopped, *flags, "--resume", stopped / "checkpoint-4")
    capsys.readouterr()
    run_sft(tiny_model_dir, toy_data_dir, stopped, *flags, "--resume", "latest")
    said = capsys.readouterr().out
    assert f"--resume latest: {stopped}/checkpoint-4 is damaged ({damaged} has {size // 2} bytes" in said
    assert f"resumed from {stopped}/checkpoint-2 after step 2" in said
    assert [m["step"] for m in lines_of(stopped / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    a, b = (load_file(d / "final" / "model.safetensors") for d in (tmp_path / "straight", stopped))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert runtime.damage(str(stopped / "checkpoint-4")) is None  # written again, whole


@pytest.mark.parametrize("failure", ["ENOSPC in the weights", "torch.save's unexpected pos"])
def test_a_full_disk_is_named_and_leaves_earlier_checkpoints(failure, tiny_model_dir, toy_data_dir, tmp_path,
                                                             monkeypatch):
    """The disk fills while checkpoint-4 is written: the run stops with one message naming the folder,
    the space free and the space the save needs; checkpoint-4.tmp is gone, checkpoint-2 is intact,
    and --resume latest after freeing space ends with the uninterrupted run's weights."""
    flags = ["--max_steps", "6", "--save_steps", "2"]
    run_sft(tiny_model_dir, toy_data_dir, tmp_path / "straight", *flags)
    out = tmp_path / "full"
    save_model = runtime.save_model

    def full(accelerator, model, processor, folder, dtype):
        if folder.endswith("checkpoint-4.tmp"):
            Path(folder, "model.safetensors").write_bytes(b"\0" * 1000)  # what got written
            if failure.startswith("ENOSPC"):
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return save_model(accelerator, model, processor, folder, dtype)

    monkeypatch.setattr(runtime, "save_model", full)
    with pytest.raises(runtime.SaveFailed) as raised:
        run_sft(tiny_model_dir, toy_data_dir, out, *flags)
    message = str(raised.value)
    assert message.startswith(f"saving {out}/checkpoint-4: no space left on the device (")
    assert " GB free; the save needs about " in message and f"{out}/checkpoint-4.tmp was removed" in message
    needed = runtime.folder_size(str(out / "checkpoint-2"))
    assert f"needs about {needed / 1e9:.2f} GB" in message
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2"]
    assert runtime.damage(str(out / "checkpoint-2")) is None
    monkeypatch.setattr(runtime, "save_model", save_model)
    run_sft(tiny_model_dir, toy_data_dir, out, *flags, "--resume", "latest")
    a, b = (load_file(d / "final" / "model.safetensors") for d in (tmp_path / "straight", out))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# SIGTERM: finish the step, save, say where, exit 75
# ---------------------------------------------------------------------------------------------


def test_sigterm_saves_the_step_and_exits_75(tiny_model_dir, toy_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = script("sft", "--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", out, *SFT,
                  "--max_steps", "2000", "--save_steps", "1000")
    wait_for(lambda: len(lines_of(out / "metrics.jsonl")) >= 3, proc, "three steps")
    proc.send_signal(signal.SIGTERM)
    said, err = proc.communicate(timeout=120)
    assert proc.returncode == runtime.STOPPED == 75, err[-2000:]
    steps = [m["step"] for m in lines_of(out / "metrics.jsonl")]
    n = steps[-1]
    assert steps == list(range(1, n + 1)) and "Traceback" not in err
    assert said.strip().splitlines()[-1] == (f"stopped by SIGTERM after step {n}: {out}/checkpoint-{n} holds it; "
                                             "run the same command with --resume latest to continue")
    assert json.loads((out / f"checkpoint-{n}" / "resume_state.json").read_text())["step"] == n
    assert runtime.damage(str(out / f"checkpoint-{n}")) is None and not (out / "final").exists()


def test_sigterm_under_accelerate_launch_stops_every_process_after_one_step(tiny_model_dir, toy_data_dir,
                                                                            tmp_path):
    """SIGTERM to the whole job (as Slurm sends it): both grpo processes agree on the step (one
    all-reduce), save it once and exit 75. The launcher is torchrun's: it forwards the signal, waits
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default) and prints its own SignalException; nothing of
    ours raises."""
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "cpu_2proc.yaml"), "grpo.py", "--model", tiny_model_dir, "--data",
              toy_data_dir, "--output_dir", str(out), "--rollout_batch_size", "4", "--group_size", "2",
              "--mini_batch_size", "2", "--max_new_tokens", "4", "--max_steps", "500", "--save_steps", "0",
              "--eval_every", "0", "--gradient_checkpointing", "False"]
    proc = subprocess.Popen(launch, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    wait_for(lambda: len(lines_of(out / "metrics.jsonl")) >= 1, proc, "a first step", seconds=180)
    os.killpg(proc.pid, signal.SIGTERM)
    said, err = proc.communicate(timeout=120)
    steps = [m["step"] for m in lines_of(out / "metrics.jsonl")]
    n = steps[-1]
    assert steps == list(range(1, n + 1))
    assert f"stopped by SIGTERM after step {n}: {out}/checkpoint-{n} holds it" in said, said + err[-3000:]
    assert 'grpo.py", line' not in err  # no traceback from our code on any process
    assert runtime.damage(str(out / f"checkpoint-{n}")) is None
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"checkpoint-{n}"]


def test_sigterm_in_evaluate_keeps_every_finished_row(tiny_model_dir, toy_data_dir, tmp_path):
    out = tmp_path / "eval"
    flags = ["--model", tiny_model_dir, "--data", toy_data_dir, "--split", "test", "--output_dir", out,
             "--max_new_tokens", "32", "--batch_size", "1"]
    proc = script("evaluate", *flags)
    part = out / "predictions.rank0.jsonl"
    wait_for(lambda: len(lines_of(part)) >= 2, proc, "two rows")
    proc.send_signal(signal.SIGTERM)
    said, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and "Traceback" not in err, err[-2000:]
    kept = lines_of(part)  # every line whole
    assert f"rank 0: stopped by SIGTERM; its finished rows are in {part}" in said
    assert 2 <= len(kept) < 24
    evaluate.main(list(map(str, flags)))  # the same command again: the rest of the rows
    final = lines_of(out / "predictions.jsonl")
    assert len(final) == 24
    by_key = {(line["dataset_name"], line["dataset_index"]): line for line in final}
    assert all(by_key[(line["dataset_name"], line["dataset_index"])] == line for line in kept)


# ---------------------------------------------------------------------------------------------
# Nonsense refused before any work; prompts beyond the context; one-line errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--beta", "-1"], "--beta -1.0 is negative"),
    (["--learning_rate=-1e-6"], "--learning_rate -1e-06 is negative"),
    (["--eps_high", "-0.2"], "--eps_high -0.2 is negative"),
    (["--max_grad_norm", "-1"], "--max_grad_norm -1.0 is negative"),
    (["--dual_clip", "0.5"], "--dual_clip 0.5 must be above 1"),
    (["--max_steps", "0", "--num_epochs", "0"], "nothing to train"),
])
def test_grpo_refuses_nonsense_before_any_work(flags, message, tiny_model_dir, toy_data_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        grpo.main(["--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", str(tmp_path / "run"),
                   *flags])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "-1"], "--learning_rate -1.0 is negative"),
    (["--max_steps", "0", "--num_epochs", "0"], "nothing to train"),
])
def test_sft_refuses_nonsense_before_any_work(flags, message, tiny_model_dir, toy_data_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        sft.main(["--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", str(tmp_path / "run"),
                  *flags])
    assert not (tmp_path / "run").exists()


def snapshot(folder) -> dict:
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*")}


@pytest.mark.parametrize("stage", ["sft", "grpo", "evaluate"])
@pytest.mark.parametrize("inside", ["data", "model"])
def test_an_output_folder_inside_an_input_is_refused(stage, inside, tiny_model_dir, toy_data_dir, tmp_path):
    folders = {"data": toy_data_dir, "model": tiny_model_dir}
    before = {name: snapshot(folder) for name, folder in folders.items()}
    out = os.path.join(folders[inside], "run")
    argv = ["--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", out]
    main = {"sft": sft.main, "grpo": grpo.main, "evaluate": evaluate.main}[stage]
    with pytest.raises(SystemExit, match=f"--output_dir {out} is inside the input folder {folders[inside]}"):
        main(argv + (["--split", "test"] if stage == "evaluate" else []))
    assert {name: snapshot(folder) for name, folder in folders.items()} == before


@pytest.fixture(scope="module")
def short_context_model(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model told its context is 100 positions: the toy prompts are 88 to 104 tokens."""
    out = tmp_path_factory.mktemp("short_context")
    for name in os.listdir(tiny_model_dir):
        os.symlink(os.path.join(tiny_model_dir, name), out / name)
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 100
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps(config))
    assert AutoConfig.from_pretrained(out).get_text_config().max_position_embeddings == 100
    return str(out)


def test_prompts_beyond_the_context_are_skipped_counted_or_refused(short_context_model, toy_data_dir, tmp_path,
                                                                   capsys):
    """evaluate skips and counts them (bad_rows.jsonl, results.json); sft drops the sequences and
    says which bound; grpo refuses a --max_prompt_length beyond the context."""
    results = evaluate.main(["--model", short_context_model, "--data", toy_data_dir, "--split", "test",
                             "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "2"])
    skipped = results["skipped"]["rows"]
    answered = lines_of(tmp_path / "eval" / "predictions.jsonl")
    assert skipped and answered and len(skipped) + len(answered) == 24
    assert all("is longer than the model's context (100 positions)" in s["reason"] for s in skipped)
    assert len(lines_of(tmp_path / "eval" / "bad_rows.jsonl")) == len(skipped)
    capsys.readouterr()
    with pytest.raises(ValueError, match="usable rows, fewer than one global batch"):
        run_sft(short_context_model, toy_data_dir, tmp_path / "sft", "--max_steps", "1")
    assert "dropped as longer than the model's context (100 positions; --max_length is 8192)" in \
        capsys.readouterr().out
    with pytest.raises(ValueError, match="--max_prompt_length 2048 is beyond .*context \\(100 positions\\)"):
        grpo.main(["--model", short_context_model, "--data", toy_data_dir, "--output_dir", str(tmp_path / "grpo")])


def test_a_missing_input_file_is_named_with_its_flag(toy_data_dir, tmp_path):
    """A file a flag names that is not there: the flag and the path in one line, before any output
    folder is made (curate.py's --predictions, evaluate.py's --regrade)."""
    import re

    import curate

    missing = str(tmp_path / "missing.jsonl")
    for command in ("filter", "traces"):
        with pytest.raises(FileNotFoundError, match=f"^--predictions {re.escape(missing)}: no such file$"):
            curate.main([command, "--data", toy_data_dir, "--predictions", missing,
                         "--output_dir", str(tmp_path / command)])
    with pytest.raises(FileNotFoundError, match=f"^--regrade {re.escape(missing)}: no such file$"):
        evaluate.main(["--regrade", missing, "--output_dir", str(tmp_path / "regrade")])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage,flag,message", [
    ("grpo", "--rollout_batch_size 0", "--rollout_batch_size 0 must be 1 or more"),  # unchecked: a ZeroDivisionError
    ("grpo", "--mini_batch_size 0", "--mini_batch_size 0 must be 1 or more"),  # unchecked: a ZeroDivisionError
    ("grpo", "--generation_batch_size 0", "--generation_batch_size 0 must be 1 or more"),  # unchecked: range()'s error
    ("grpo", "--micro_batch_size 0", "--micro_batch_size 0 must be 1 or more"),
    ("grpo", "--max_new_tokens 0", "--max_new_tokens 0 must be 1 or more"),  # unchecked: transformers' error, mid-run
    ("grpo", "--top_p 1.5", "--top_p 1.5 must be above 0 and at most 1"),  # unchecked: a run
    ("sft", "--micro_batch_size 0", "--micro_batch_size 0 must be 1 or more"),  # unchecked: a ZeroDivisionError
    ("evaluate", "--max_new_tokens 0", "--max_new_tokens 0 must be 1 or more"),  # unchecked: an error after the folder is claimed
    ("evaluate", "--temperature -1", "--temperature -1.0 is negative; it must be 0 \\(greedy\\) or more"),
    ("evaluate", "--top_p 0", "--top_p 0.0 must be above 0 and at most 1"),  # unchecked: a run
])
def test_a_size_below_one_or_a_bad_sampling_setting_is_one_line_before_any_work(stage, flag, message,
                                                                                 toy_data_dir, tmp_path):
    """Unchecked, each would be a traceback, another library's error after the run folder is claimed, or a run."""
    main = {"grpo": grpo.main, "sft": sft.main, "evaluate": evaluate.main}[stage]
    with pytest.raises(ValueError, match=f"^{message}$"):
        main(["--model", str(tmp_path / "never_loaded"), "--data", toy_data_dir,
              "--output_dir", str(tmp_path / "run"), *flag.split()])
    assert not (tmp_path / "run").exists()


def test_named_errors_are_one_line_and_the_traceback_is_one_variable_away(tiny_model_dir, toy_data_dir, tmp_path,
                                                                         monkeypatch):
    """As a user runs it (a process): one line, exit 1. With MEDVLT_TRACEBACK=1 (through run_main,
    here) the error itself, with its traceback."""
    flags = ["--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", str(tmp_path / "run"), "--beta", "-1"]
    proc = script("grpo", *flags)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip().splitlines() == ["grpo.py: error: --beta -1.0 is negative; it must be 0 or more"]
    monkeypatch.setenv(runtime.TRACEBACK, "1")
    with pytest.raises(ValueError, match="--beta -1.0 is negative"):
        runtime.run_main(lambda: grpo.main(flags))
