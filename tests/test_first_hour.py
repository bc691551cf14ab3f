"""What a newcomer meets first (issue 24): every bad start named in one line before any work, with
nothing left locked or claimed, so that the corrected command runs in the same folder; settings
files anywhere on the line; --help showing every default, in every script.

The bad starts run through `runtime.run_main`, the scripts' command-line entry, in this process
(a Python start per case would cost ~5 s); tests/test_reliability.py runs one as a real process."""

import sys
from pathlib import Path

import pytest

import curate
import evaluate
import grpo
import runtime
import sft
import toy

BAD_YAML = "learning_rate: [1e-3\nbeta: 0.01\n"


def start(main, argv, monkeypatch, capsys) -> tuple[int, str]:
    """`python NAME.py ARGV` as run_main runs it: (exit status, what it printed on stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{main.__module__}.py", *argv])
    with pytest.raises(SystemExit) as ended:
        runtime.run_main(lambda: main(argv))
    return ended.value.code, capsys.readouterr().err


def bad_starts(tmp_path, model, data):
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "typo.yaml").write_text("learning_rat: 1e-3\n")
    return [
        (["--model", "runs/toy/nope", "--data", data], "--model runs/toy/nope: no such model folder"),
        (["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--data", data],
         "--model Qwen/Qwen2.5-VL-3B-Instruct: not a local folder, and not in the hub cache ("),
        (["--model", model, "--data", "runs/toy/nodata"], "runs/toy/nodata: no such data folder or file"),
        (["--model", model, "--data", "someone/not-cached"], "someone/not-cached: not a local folder or file, "
                                                              "and the hub cannot give it"),
        (["--model", model, "--data", data, str(tmp_path / "bad.yaml")],
         f"{tmp_path / 'bad.yaml'}: not valid YAML (expected ',' or ']', but got ':' at line 2, column 5)"),
        (["--model", model, "--data", data, "--config", str(tmp_path / "typo.yaml")],
         f"{tmp_path / 'typo.yaml'}: unknown setting(s) 'learning_rat' (did you mean learning_rate?)"),
        (["--model", model, "--data", data, "--config", str(tmp_path / "none.yaml")],
         f"{tmp_path / 'none.yaml'}: no such settings file"),
        (["--model", model, "--data", data, "--learning_rat", "1e-3"],
         "unknown argument '--learning_rat' (did you mean --learning_rate?); --help lists every flag"),
        (["--model", model, "--data", data, "--max_step", "2"],
         "unknown argument '--max_step' (did you mean --max_steps?)"),  # no prefix matching
        (["--model", model, "--data", data, "--max_steps", "two"], "argument --max_steps/--max-steps: invalid int"),
    ]


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_bad_starts_are_one_line_and_leave_the_folder_free(stage, tiny_model_dir, toy_data_dir, tmp_path,
                                                          monkeypatch, capsys):
    main = {"grpo": grpo.main, "sft": sft.main}[stage]
    out = tmp_path / "run"
    split = ["--split", "sft"] if stage == "sft" else []
    for argv, message in bad_starts(tmp_path, tiny_model_dir, toy_data_dir):
        code, err = start(main, [*argv, *split, "--output_dir", str(out)], monkeypatch, capsys)
        assert code == 1 and "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("checking", "measuring"))]
        assert len(lines) == 1 and lines[0].startswith(f"{stage}.py: error: {message}"), err
        assert not out.exists()
    # A start that fails after claiming the folder (too few rows for the batch) gives it back.
    late = ["--rollout_batch_size", "512", "--mini_batch_size", "512"] if stage == "grpo" else \
        ["--global_batch_size", "4096", "--micro_batch_size", "1"]
    code, err = start(main, ["--model", tiny_model_dir, "--data", toy_data_dir, *split, "--output_dir", str(out),
                             *late], monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err and "fewer than" in err.strip().splitlines()[-1]
    assert not out.exists()
    # The corrected command runs in the same folder, the settings file after the flags.
    (tmp_path / "fine.yaml").write_text("max_steps: 1\nsave_steps: 0\n")
    quick = ["--rollout_batch_size", "2", "--mini_batch_size", "2", "--group_size", "2", "--max_new_tokens", "2",
             "--eval_every", "0"] if stage == "grpo" else ["--global_batch_size", "2", "--micro_batch_size", "2"]
    corrected = ["--model", tiny_model_dir, "--data", toy_data_dir, *split, "--output_dir", str(out), *quick,
                 "--config", str(tmp_path / "fine.yaml")]
    monkeypatch.setattr(sys, "argv", [f"{stage}.py", *corrected])
    runtime.run_main(lambda: main(corrected))
    assert (out / "final" / "model.safetensors").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "final" / "README.md")  # the run's own model card
    assert stage in card.data.tags and f"{stage.upper()} of `{tiny_model_dir}`" in card.text
    assert f"{stage}.py --model {tiny_model_dir}" in card.text


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_push_to_hub_is_checked_before_any_work_and_uploads_final(stage, tiny_model_dir, toy_data_dir, tmp_path,
                                                                  monkeypatch, capsys):
    """--push_to_hub: offline, no token or a hub that refuses are each one line before any work (the
    folder stays free); a finished run uploads final/ (model card included) to USER/NAME; a failed
    upload is named, and final/ stays saved."""
    import huggingface_hub
    from huggingface_hub import HfApi

    main = {"grpo": grpo.main, "sft": sft.main}[stage]
    out = tmp_path / "med-run"
    quick = ["--rollout_batch_size", "2", "--mini_batch_size", "2", "--group_size", "2", "--max_new_tokens", "2",
             "--eval_every", "0"] if stage == "grpo" else ["--global_batch_size", "2", "--micro_batch_size", "2",
                                                          "--split", "sft"]
    argv = ["--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", str(out), "--max_steps", "1",
            "--save_steps", "0", "--push_to_hub", *quick]

    def refused(message):
        code, err = start(main, argv, monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith(f"{stage}.py: error: --push_to_hub: {message}"), err
        assert not out.exists()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refused("the hub is switched off here (HF_HUB_OFFLINE=1). Train without it and upload final/ later")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    refused("no Hugging Face token. Run `hf auth login`, or set HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")

    def unreachable(self):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")
    monkeypatch.setattr(HfApi, "whoami", unreachable)
    refused("the hub at https://huggingface.co did not accept the token (ConnectionError: Failed to resolve "
            "'huggingface.co')")

    calls = []
    monkeypatch.setattr(HfApi, "whoami", lambda self: {"name": "lab"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload(self, repo_id, folder_path, **kw):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        if repo_id.endswith("fails"):
            raise OSError("connection reset")
        return f"https://huggingface.co/{repo_id}/tree/main"
    monkeypatch.setattr(HfApi, "upload_folder", upload)
    monkeypatch.setattr(sys, "argv", [f"{stage}.py", *argv])
    runtime.run_main(lambda: main(argv))
    assert calls[0] == ("create", "lab/med-run", {"private": True, "exist_ok": True})
    assert calls[1][:2] == ("upload", "lab/med-run") and {"README.md", "model.safetensors"} <= set(calls[1][2])
    assert f"pushed {out / 'final'} to https://huggingface.co/lab/med-run" in capsys.readouterr().out
    # A failed upload: one line naming the saved folder and the command that sends it later.
    other = ["--output_dir", str(tmp_path / "other"), "--hub_model_id", "team/fails"]
    code, err = start(main, [*argv, *other], monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"{stage}.py: error: --push_to_hub: uploading {tmp_path / 'other' / 'final'} to team/fails failed "
        f"(OSError: connection reset); the model is saved there: hf upload team/fails {tmp_path / 'other' / 'final'}")
    assert (tmp_path / "other" / "final" / "README.md").exists()


def test_evaluate_bad_starts_are_one_line(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    for argv, message in bad_starts(tmp_path, tiny_model_dir, toy_data_dir)[:4]:
        code, err = start(evaluate.main, [*argv, "--split", "test", "--output_dir", str(out)], monkeypatch, capsys)
        assert code == 1 and err.strip().splitlines()[-1].startswith(f"evaluate.py: error: {message}"), err
        assert "Traceback" not in err and not out.exists()


def test_settings_file_anywhere_and_a_json_data_file_is_data(tmp_path):
    (tmp_path / "s.yaml").write_text("beta: 0.0\nlearning_rate: 2.0e-6\n")
    for argv in (["--data", "d", str(tmp_path / "s.yaml")], [str(tmp_path / "s.yaml"), "--data", "d"],
                 ["--config", str(tmp_path / "s.yaml"), "--data", "d"], ["--data", "d", f"--config={tmp_path / 's.yaml'}"]):
        args = runtime.parse_args(grpo.Args, argv=argv)
        assert (args.beta, args.learning_rate, args.data) == (0.0, 2e-6, "d")
    args = runtime.parse_args(grpo.Args, argv=[str(tmp_path / "s.yaml"), "--data", "rows.json", "--beta", "0.5"])
    assert (args.data, args.beta) == ("rows.json", 0.5)  # a flag's value is never the settings file; flags win
    with pytest.raises(SystemExit, match="one settings file at a time"):
        runtime.parse_args(grpo.Args, argv=[str(tmp_path / "s.yaml"), "--config", str(tmp_path / "s.yaml")])


HELPS = {
    "grpo": lambda: runtime.parse_args(grpo.Args, grpo.engines.EngineArgs, runtime.RunArgs, runtime.GuardArgs,
                                       argv=["--help"]),
    "sft": lambda: runtime.parse_args(sft.Args, runtime.RunArgs, argv=["--help"]),
    "evaluate": lambda: runtime.parse_args(evaluate.Args, argv=["--help"]),
    "toy model": lambda: toy.main(["model", "--help"]),
    "curate prepare": lambda: curate.main(["prepare", "--help"]),
}


@pytest.mark.parametrize("name", HELPS)
def test_help_shows_every_default(name, capsys):
    with pytest.raises(SystemExit) as ended:
        HELPS[name]()
    assert ended.value.code == 0
    text = capsys.readouterr().out
    flags = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert len(flags) >= 4
    # Each flag's block of help holds its default (argparse wraps long help over several lines).
    blocks = text.split("\n  --")[1:]
    assert all("default" in block for block in blocks), [b.split()[0] for b in blocks if "default" not in b]


@pytest.mark.parametrize("script", [toy, curate])
def test_top_level_help_lists_the_commands_and_exits_0(script, capsys):
    script.main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python {Path(script.__file__).name} ") and "--help" in text


def test_final_holds_a_model_card_the_hub_reads(tmp_path):
    """final/README.md: huggingface_hub's ModelCard parses it, with the base model and data sets as
    metadata (hub ids; a local path is named in the text only), the command, settings and metrics."""
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    run.mkdir()
    (run / runtime.RUN_FILE).write_text('{"stage": "grpo", "settings": {"beta": 0.01, "group_size": 8}}')
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.25, "time_update": 3.0}\n'
                                       '{"step": 2, "reward": 0.5, "time_update": 2.0}\n')
    for base, data, hub_base, hub_data in [
            ("Qwen/Qwen2.5-VL-3B-Instruct", "UCSC-VLAA/MedVLThinker-m23k", "Qwen/Qwen2.5-VL-3B-Instruct",
             ["UCSC-VLAA/MedVLThinker-m23k"]),
            (str(tmp_path), str(tmp_path / "data"), None, None)]:
        runtime.model_card({"stage": "grpo", "base_model": base, "datasets": [data]}, str(run), 2).save(
            tmp_path / "README.md")
        card = ModelCard.load(tmp_path / "README.md")
        assert (card.data.base_model, card.data.datasets) == (hub_base, hub_data)
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
        assert "grpo" in card.data.tags
        assert f"GRPO of `{base}` on `{data}`, 2 steps" in card.text
        assert '"group_size": 8' in card.text and '"reward": 0.5' in card.text and "time_update" not in card.text


def test_the_labs_settings_are_the_demos():
    """The README's labs set G to the demo's GRPO settings: the Makefile's DEMO_GRPO_ARGS with the
    demo's folder and seed, so the labs run as printed."""
    import re

    root = Path(__file__).resolve().parents[1]
    makefile = (root / "Makefile").read_text()
    found = re.search(r"^DEMO_GRPO_ARGS = (.*?)\n\n", makefile, re.M | re.S).group(1)
    demo_args = " ".join(found.replace("\\\n", " ").split()).replace("$(DEMO)", "runs/demo").replace("$(SEED)", "0")
    labs = re.search(r'^G="(.*)"$', (root / "README.md").read_text(), re.M).group(1)
    assert labs == demo_args


def test_curves_label_their_axes_units_and_sparse_points(tmp_path, monkeypatch):
    """--curves: 'training step' on whole steps, the metric and its unit on the y axis, and points
    on a sparse series (validation every N steps)."""
    import json

    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: saved.append(self))
    lines = [{"step": s, "loss": 1 / s, "reward": s / 10} for s in range(1, 61)]
    lines += [{"step": s, "val_accuracy": 0.5 + s / 200} for s in (0, 20, 40, 60)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    evaluate.plot_curves([f"reward={tmp_path / 'm.jsonl'}:reward", f"validation={tmp_path / 'm.jsonl'}:val_accuracy",
                          f"loss={tmp_path / 'm.jsonl'}:loss"], tmp_path / "curves.png")
    reward_ax, val_ax, loss_ax = saved[0].axes
    assert [ax.get_ylabel() for ax in saved[0].axes] == ["reward (0-1)", "val_accuracy (0-1)", "loss"]
    assert all(ax.get_xlabel() == "training step" for ax in saved[0].axes)
    assert val_ax.lines[0].get_marker() == "o" and reward_ax.lines[0].get_marker() in (None, "None", "")
    assert all(float(t).is_integer() for t in val_ax.get_xticks())
