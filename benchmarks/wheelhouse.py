"""Every wheel the project needs beyond PyTorch, in one folder, for a GPU server without internet.

    make wheelhouse                                   # dist/wheelhouse, for this machine's Python
    python benchmarks/wheelhouse.py --output DIR --python-version 3.10
    bash benchmarks/gpu_check.sh --wheelhouse DIR     # on the server: installs from DIR alone, then runs

A GPU server typically has a CUDA build of PyTorch (with torchvision) and little else. The folder
holds requirements.txt's packages and requirements-trl.txt's TRL (for the side-by-side of
benchmarks/grpo_vs_trl.py), with everything they need, as pip resolves them against the pins, minus
what the server already has: torch, torchvision and their own requirements (numpy and pillow, the
CUDA libraries, triton, sympy, ...). The test, plot and logging extras (pytest, matplotlib,
tensorboard) are left out. DIR/requirements.txt lists the pins; gpu_check.sh --wheelhouse installs
them with `pip install --no-index --find-links DIR` into a virtual environment of its own that sees
the machine's PyTorch (`--system-site-packages`).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = {"torch", "torchvision", "pytest", "matplotlib", "tensorboard"}
# What a CUDA PyTorch install with torchvision brings; a name of torch's own requirements is added
# when pip reports it.
THE_SERVERS = {"torch", "torchvision", "numpy", "pillow", "triton"}
SERVER_PREFIXES = ("nvidia-", "cuda-")


def name_of(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def wanted() -> list[str]:
    """requirements.txt and requirements-trl.txt, minus PyTorch and the extras."""
    lines = []
    for file in ("requirements.txt", "requirements-trl.txt"):
        for line in (ROOT / file).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and name_of(line) not in LEFT_OUT:
                lines.append(line)
    return sorted(set(lines))


def resolve(requirements: list[str], target: list[str]) -> list[dict]:
    """pip's resolution of `requirements` for the target Python, as a report (pip install --dry-run),
    constrained to the versions this environment has (the ones the tests ran with)."""
    with tempfile.TemporaryDirectory() as folder:
        report, listed = Path(folder) / "report.json", Path(folder) / "requirements.txt"
        listed.write_text("\n".join(requirements) + "\n")
        frozen = subprocess.run([sys.executable, "-m", "pip", "freeze"], check=True, capture_output=True, text=True)
        (Path(folder) / "tested.txt").write_text("\n".join(line for line in frozen.stdout.splitlines()
                                                          if "==" in line and "+" not in line) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--only-binary=:all:", *target, "--report", str(report), "-r", str(listed),
                        "-c", str(Path(folder) / "tested.txt")], check=True)
        return json.loads(report.read_text())["install"]


def servers_own(resolved: list[dict]) -> set[str]:
    """Names the server's PyTorch brings: torch, torchvision, their requirements, recursively."""
    requires = {name_of(item["metadata"]["name"]): [name_of(r) for r in item["metadata"].get("requires_dist") or []
                                                    if "extra ==" not in r]
                for item in resolved}
    own, stack = set(), list(THE_SERVERS)
    while stack:
        name = stack.pop()
        if name not in own:
            own.add(name)
            stack += requires.get(name, [])
    return own | {n for n in requires if n.startswith(SERVER_PREFIXES)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", default="dist/wheelhouse", help="The folder (made or emptied of wheels).")
    parser.add_argument("--python-version", default=None,
                        help="The server's Python, e.g. 3.10 (default: this one); wheels for manylinux x86_64.")
    args = parser.parse_args(argv)
    target = []
    if args.python_version:
        target = ["--python-version", args.python_version, "--platform", "manylinux_2_28_x86_64",
                  "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64"]
    resolved = resolve(wanted(), target)
    own = servers_own(resolved)
    pins = sorted(f"{item['metadata']['name']}=={item['metadata']['version']}" for item in resolved
                  if name_of(item["metadata"]["name"]) not in own)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    (out / "requirements.txt").write_text(
        "# benchmarks/wheelhouse.py: every package the project needs beyond PyTorch and torchvision\n"
        + "\n".join(pins) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", *target,
                    "-d", str(out), "-r", str(out / "requirements.txt")], check=True)
    wheels = sorted(out.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
    total = sum(p.stat().st_size for p in wheels)
    print(f"{out}: {len(wheels)} wheels, {total / 1e6:.1f} MB (largest: "
          + ", ".join(f"{p.name.split('-')[0]} {p.stat().st_size / 1e6:.1f} MB" for p in wheels[:3]) + ")")
    print(f"left to the server's PyTorch: {', '.join(sorted(n for n in own if not n.startswith(SERVER_PREFIXES)))}")
    return total


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
