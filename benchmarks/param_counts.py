"""Trainable values of each method on all-MiniLM-L6-v2 (36 linear layers of the encoder blocks).

    python benchmarks/param_counts.py

Trainable values at injection, the adapter alone (no classifier head). PEFT's AdaLoRA on the same
layers is counted for reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _minilm import load_model  # noqa: E402
from step_time import ENCODER_LINEARS  # noqa: E402

import hypermerge as hm  # noqa: E402


def count(config: hm.AdapterConfig) -> tuple[int, int]:
    model = hm.inject(load_model(0), config)  # no modules_to_save: the adapter alone
    trainable = hm.trainable_parameters(model)
    n = len(hm.adapter_layers(model))
    return trainable, n


def main() -> None:
    torch.set_num_threads(1)
    init_r, target_r = 12, 8
    rows = []
    for name, config in [
        ("LoRA r=8", hm.LoRAConfig(r=8)),
        ("AdaLoRA init_r=12", hm.AdaLoRAConfig(init_r=init_r, target_r=target_r)),
        ("HyperAdaLoRA init_r=12, d=64, depth 2", hm.HyperAdaLoRAConfig(init_r=init_r, target_r=target_r)),
        ("HyperAdaLoRA init_r=12, d=32, depth 2", hm.HyperAdaLoRAConfig(init_r=init_r, target_r=target_r, hyper_dim=32)),
        ("HyperLoRA r=8, d=64, depth 2", hm.HyperLoRAConfig(r=8)),
        ("HyperAdapt", hm.HyperAdaptConfig()),
    ]:
        trainable, n = count(config)
        rows.append((name, trainable, n))
    import peft

    peft_model = peft.get_peft_model(load_model(0), peft.AdaLoraConfig(target_modules=ENCODER_LINEARS, init_r=init_r,
                                                                       target_r=target_r, total_step=100))
    rows.append(("PEFT AdaLoRA init_r=12", sum(p.numel() for p in peft_model.parameters() if p.requires_grad), 36))
    print("| method | trainable values | matrices |\n|---|---|---|")
    for name, trainable, n in rows:
        print(f"| {name} | {trainable:,} | {n} |")


if __name__ == "__main__":
    main()
