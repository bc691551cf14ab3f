"""One vocabulary across the stage scripts, and the tracker option.

Every stage (curate.py's subcommands, sft.py, grpo.py, evaluate.py) parses its arguments with
runtime.parse_args: a YAML or JSON settings file may come first, flags after it override it, and each
takes --output_dir and --seed (the parse tests stop at the parse: no model, no data). toy.py is
tested as well once it takes --output_dir. --report_to tensorboard writes event files that
tensorboard reads back, for sft.py and grpo.py; a tracker that is not installed is an error.
"""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import curate
import evaluate
import grpo
import runtime
import sft
import toy

# Per stage: its main, the arguments before the settings file (curate's subcommand), and settings
# only the file gives (the required ones among them, so the file makes them optional; for sft.py
# and grpo.py one of each of their dataclasses).
STAGES = {
    "curate.py prepare": (curate.main, ["prepare"], {"data": "d", "min_side": 30}),
    "curate.py filter": (curate.main, ["filter"], {"data": "d", "min_pass": 2}),
    "curate.py traces": (curate.main, ["traces"], {"data": "d", "predictions": "p.jsonl"}),
    "curate.py split": (curate.main, ["split"], {"data": "d", "n": 5}),
    "curate.py mix": (curate.main, ["mix"], {"data": ["a", "b"]}),
    "sft.py": (sft.main, [], {"data": "d", "learning_rate": 0.5, "save_steps": 7}),
    "grpo.py": (grpo.main, [], {"data": "d", "group_size": 3, "micro_batch_size": 5, "save_steps": 7,
                                "max_skipped_steps": 2}),
    "evaluate.py": (evaluate.main, [], {"max_new_tokens": 7}),
}


class Parsed(Exception):
    """Raised with the parsed arguments, so that a stage stops right after parsing."""


@pytest.fixture
def stop_after_parsing(monkeypatch):
    parse = runtime.parse_args

    def parse_then_stop(*classes, argv=None, defaults=None):
        raise Parsed(parse(*classes, argv=argv, defaults=defaults))

    monkeypatch.setattr(runtime, "parse_args", parse_then_stop)


def setting(parsed: Parsed, name: str):
    """A setting of what a stage parsed: one dataclass, or several (grpo.py's Args, EngineArgs,
    RunArgs, GuardArgs), each field in exactly one of them."""
    found = parsed.args[0]
    holders = [obj for obj in (found if isinstance(found, tuple) else (found,)) if hasattr(obj, name)]
    assert len(holders) == 1, (name, holders)
    return getattr(holders[0], name)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_takes_a_settings_file_output_dir_and_seed(stage, suffix, stop_after_parsing, tmp_path):
    main, before, only_in_file = STAGES[stage]
    settings = dict(only_in_file, output_dir="from-the-file", seed=1)
    path = tmp_path / f"settings{suffix}"
    # JSON is YAML too; the file's suffix picks the reader.
    path.write_text(json.dumps(settings))
    with pytest.raises(Parsed) as parsed:
        main([*before, str(path), "--output_dir", str(tmp_path / "out"), "--seed", "3"])
    # Flags override the file.
    assert (setting(parsed.value, "output_dir"), setting(parsed.value, "seed")) == (str(tmp_path / "out"), 3)
    for key, value in only_in_file.items():
        assert setting(parsed.value, key) == value, key


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_unknown_setting_in_the_file_is_refused(stage, tmp_path):
    main, before, only_in_file = STAGES[stage]
    path = tmp_path / "settings.yaml"
    path.write_text(json.dumps(dict(only_in_file, output_dir="o", per_device_batch_sise=2)))
    with pytest.raises(SystemExit, match="unknown setting.*per_device_batch_sise"):
        main([*before, str(path)])


def test_toy_takes_output_dir_and_seed(stop_after_parsing, tmp_path):
    with pytest.raises(Parsed) as parsed:
        toy.main(["model", "--output_dir", str(tmp_path), "--seed", "3"])
    assert (setting(parsed.value, "output_dir"), setting(parsed.value, "seed")) == (str(tmp_path), 3)


# ---------------------------------------------------------------------------------------------
# Trackers: --report_to tensorboard writes what tensorboard reads
# ---------------------------------------------------------------------------------------------


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar in the event files of a folder, as tensorboard reads them."""
    events = EventAccumulator(str(folder))
    events.Reload()
    assert tag in events.Tags()["scalars"], events.Tags()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_sft_logs_to_tensorboard(tiny_model_dir, toy_data_dir, tmp_path):
    out = tmp_path / "sft"
    sft.main(["--model", tiny_model_dir, "--data", toy_data_dir, "--split", "sft", "--output_dir", str(out),
              "--global_batch_size", "4", "--micro_batch_size", "4", "--max_steps", "2", "--save_steps", "0",
              "--save_final", "False", "--report_to", "tensorboard"])
    logged = [(m["step"], m["loss"]) for m in metrics(out)]
    assert scalars(out / "sft", "loss") == [(step, pytest.approx(loss)) for step, loss in logged]
    assert [step for step, _ in scalars(out / "sft", "lr")] == [1, 2]


def test_grpo_logs_to_tensorboard(tiny_model_dir, toy_data_dir, tmp_path):
    out = tmp_path / "grpo"
    grpo.main(["--model", tiny_model_dir, "--data", toy_data_dir, "--output_dir", str(out),
               "--rollout_batch_size", "2", "--group_size", "2", "--mini_batch_size", "2",
               "--micro_batch_size", "4", "--generation_batch_size", "2", "--max_new_tokens", "4",
               "--max_steps", "2", "--save_steps", "0", "--save_final", "False",
               "--gradient_checkpointing", "False", "--report_to", "tensorboard", "--log_completions", "1"])
    logged = [(m["step"], m["reward"]) for m in metrics(out)]
    assert scalars(out / "grpo", "reward") == [(step, pytest.approx(value)) for step, value in logged]
    # --log_completions: the step's groups as a text table, beside completions.jsonl.
    events = EventAccumulator(str(out / "grpo"))
    events.Reload()
    texts = events.Tensors("completions/text_summary")
    assert [t.step for t in texts] == [1, 2]
    first = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
    assert first["completions"][0]["text"][:20].replace("|", "/").replace("\n", " ") in \
        texts[0].tensor_proto.string_val[0].decode()


def test_a_tracker_that_is_not_installed_is_an_error(monkeypatch, tmp_path):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    for script in (sft, grpo):  # before any work: no run folder
        with pytest.raises(SystemExit, match="tensorboard package is not installed"):
            script.main(["--data", "never-read", "--output_dir", str(tmp_path / "out"),
                         "--report_to", "tensorboard"])
        assert not (tmp_path / "out").exists()
        with pytest.raises(ValueError, match="--report_to must be"):
            script.main(["--data", "never-read", "--output_dir", str(tmp_path / "out"), "--report_to", "tensorbord"])
