"""One demo table on every x86-64 machine with AVX2 (README, "One table on every machine").

fp32 bits differ between machines through three dispatchers, each taking the widest vectors the CPU
offers: ATen's kernels, oneDNN's and MKL's. `make demo` and `make quickstart` pin all three to AVX2.
benchmarks/numerics.py prints the fingerprint of a toy model's forward, backward and AdamW step;
each run here is a fresh process, as the switches are read when the libraries load."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_env

AVX2 = os.path.exists("/proc/cpuinfo") and re.search(r"\bavx2\b", open("/proc/cpuinfo").read()) is not None


def fingerprint(**env) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "numerics.py")], cwd=ROOT, text=True,
                          capture_output=True, env=run_env() | {"OMP_NUM_THREADS": "2"} | env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split("fingerprint=")[1].strip()


def demo_pins() -> dict:
    """The switches the Makefile exports for the demo and the quickstart (and whichever targets share them)."""
    text = (ROOT / "Makefile").read_text()
    return {name: value for targets, name, value in re.findall(r"^([\w -]+): export (\w+) = (\S+)$", text, flags=re.M)
            if {"demo", "quickstart"} <= set(targets.split())}


def test_the_demo_pins_every_dispatcher_to_avx2():
    assert demo_pins() == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}


@pytest.mark.slow
@pytest.mark.skipif(not AVX2, reason="the pin is for x86-64 CPUs with AVX2; this CPU has none")
def test_pinned_bits_do_not_depend_on_what_the_machine_offers():
    """Each switch decides its dispatcher's bits (another value, other bits), so none is ignored by
    this stack. ATen and oneDNN then run the pinned kernels whatever the CPU offers; MKL is the one
    dispatcher whose offer can be varied beside its pin (MKL_ENABLE_INSTRUCTIONS), and the pinned
    bits are the same whether MKL is offered AVX2 only or AVX-512. This CPU's own choice is printed:
    on one whose fastest path is AVX2 it equals the pinned bits."""
    pins = demo_pins()
    pinned = fingerprint(**pins)
    assert fingerprint(**pins | {"ATEN_CPU_CAPABILITY": "default"}) != pinned
    assert fingerprint(**pins | {"ONEDNN_MAX_CPU_ISA": "SSE41"}) != pinned
    assert fingerprint(**pins | {"MKL_CBWR": "COMPATIBLE"}) != pinned
    assert fingerprint(**pins | {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}) == pinned
    assert fingerprint(**pins | {"MKL_ENABLE_INSTRUCTIONS": "AVX512"}) == pinned
    print(f"pinned {pinned}, as this CPU picks {fingerprint()}")
