"""report.html (runtime.write_report): one self-contained page per run folder, read in a real headless
browser (Debian's Chromium; .ci/run installs it): the curves, the step selector with the logged
groups coloured by reward, and an evaluation's right and wrong answers."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import evaluate
import grpo
import runtime

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian's `chromium`; .ci/run installs it)")


def browse(page, *flags) -> str:
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *flags, page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def group(step: int, question: str, rewards: list[float]) -> dict:
    advantages = grpo.group_advantages(__import__("torch").tensor(rewards), len(rewards)).tolist()
    return {"step": step, "question": question, "answer_label": "B", "images": [], "zero_advantage": len(set(rewards)) == 1,
            "completions": [{"text": f"<think>t{i}</think><answer>{'B' if r else 'A'}</answer>", "reward": r,
                             "advantage": a, "length": 9, "format_ok": True, "truncated": False, "clipped": 0.0}
                            for i, (r, a) in enumerate(zip(rewards, advantages))]}


@needs_browser
def test_the_report_shows_curves_and_each_steps_groups_in_a_browser(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "reward": 0.25 * s, "kl": 0.01 * s, "entropy": 1.0, "completion_length": 9.0, "clip_low": 0.0,
         "clip_high": 0.01, "clip_dual": 0.0, "zero_advantage_groups": 0.5, "loss": 0.1}) + "\n" for s in (1, 2)))
    lines = [group(1, "Q one", [1.0, 0.0, 0.0, 1.0]), group(1, "Q two", [0.0, 0.0, 0.0, 0.0]),
             group(2, "Q three", [1.0, 1.0, 1.0, 0.0]), group(2, "Q four", [1.0, 1.0, 1.0, 1.0])]
    (run / "completions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    page = run / "report.html"
    assert evaluate.main(["--report", "--output_dir", str(run)]) == str(page)
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched at view time
    dom = browse(page, "--dump-dom")
    # The script ran: step 1 (the first) is shown, its two groups and eight completions.
    assert dom.count('<option value="') == 2
    shown = dom.split('<div id="groups">')[1].split("<script")[0]
    assert shown.count('class="group"') == 1 and shown.count('class="group zero"') == 1
    assert shown.count('class="completion r1"') == 2 and shown.count('class="completion r0"') == 6
    assert "Q one" in shown and "Q two" in shown and "Q three" not in shown
    # Rewards 1, 0, 0, 1: mean 0.5, std 0.577 (n - 1), so A = +-0.866.
    assert "this group contributes nothing" in shown and "advantage 0.866" in shown and "advantage -0.866" in shown
    assert 'alt="curves" src="data:image/png;base64,' in dom
    # Another step through the selector's address (report.html#step=2).
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           page.as_uri() + "#step=2"], capture_output=True, text=True, timeout=120)
    shown = done.stdout.split('<div id="groups">')[1].split("<script")[0]
    assert "Q three" in shown and "Q four" in shown and "Q one" not in shown
    assert shown.count('class="completion r1"') == 7 and shown.count('class="group zero"') == 1
    shot = tmp_path / "shot.png"
    browse(page, "--window-size=1200,1400", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # not a blank page


@needs_browser
def test_an_evaluation_report_shows_right_and_wrong_answers(tmp_path):
    from test_evaluate import HAND_LINES

    source = tmp_path / "hand.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in HAND_LINES))
    evaluate.main(["--regrade", str(source), "--output_dir", str(tmp_path / "eval")])
    dom = browse(tmp_path / "eval" / "report.html", "--dump-dom")
    assert dom.count('<details class="benchmark">') == 2  # X and Y
    assert dom.count('class="answer r1"') == 5 and dom.count('class="answer r0"') == 7  # the 12 responses


def test_a_folder_without_run_files_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl, completions.jsonl or predictions.jsonl"):
        runtime.write_report(str(tmp_path))
