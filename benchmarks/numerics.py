"""The bits this CPU computes for the toy model, as one fingerprint (README, "One table on every machine").

A tiny toy Qwen2.5-VL (vision tower included) is built from seed 0 and takes one AdamW step on a
batch of two image questions in fp32 on 2 threads, as `make demo` runs. The SHA-256 of its logits,
gradients and updated weights is printed with the ATen CPU capability in use. Machines differ in
these bits through three dispatchers: ATen's vectorised kernels (ATEN_CPU_CAPABILITY), oneDNN's
(ONEDNN_MAX_CPU_ISA) and MKL's (MKL_CBWR); `make demo` sets all three to AVX2, which every x86-64
machine with AVX2 has, so the fingerprint, and the demo's table, are the same on all of them.

    python benchmarks/numerics.py                                                   # as this machine picks
    MKL_CBWR=AVX2,STRICT ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/numerics.py
"""

import hashlib
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy  # noqa: E402


def fingerprint() -> str:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model, processor = toy.build_model(toy.ModelArgs(output_dir=folder, size="tiny"))
    model = model.float().train()
    rng = np.random.default_rng(0)
    images = [toy.radiograph(radius, rng) for radius in (0.2, 0.4)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Lesion size? A. small B. large"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    texts = [prompt + "<think>small</think><answer>A</answer>", prompt + "<think>large</think><answer>B</answer>"]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    digest = hashlib.sha256(out.logits.detach().numpy().tobytes())
    for p in model.parameters():
        if p.grad is not None:
            digest.update(p.grad.numpy().tobytes())
    optimizer.step()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    print(f"capability={torch.backends.cpu.get_cpu_capability()} fingerprint={fingerprint()}")
