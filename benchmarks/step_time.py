"""Step time and peak memory of one training step on MiniLM: ours vs PEFT's AdaLoRA, HyperAdaLoRA vs AdaLoRA.

    python benchmarks/step_time.py --pairs adalora:peft-adalora,hyperadalora:adalora --rounds 5

A step is what a training loop does: forward with labels, loss (+ the orthogonality regulariser:
PEFT adds it inside its forward, we add ``hm.regularization_loss``), backward, AdamW step, rank
allocation (PEFT's ``update_and_allocate``, our ``hm.allocate_ranks``), ``zero_grad``. Batch 16 x 64
tokens (padded to 64, so every step costs the same), 1 thread, init_r 12 -> target_r 8 on the 36
linear layers of the encoder blocks, the classifier trained in full by both.

Two phases: ``reduce`` (the budget falls and masks are recomputed every step: the allocator's
most expensive mode) and ``final`` (allocation finished during warm-up: we compute at the kept
ranks, PEFT keeps full-size matrices and re-applies its mask every step).

``adalora-unshrunk`` is AdaLoRA with the final gather undone (full-size matrices, masked): the
pair ``adalora:adalora-unshrunk`` in the final phase measures what shrinking the live modules saves.

Each measurement runs in its own process (its peak RSS is the process's ``ru_maxrss``); pairs
are run A B A B ... and the ratio is taken pair by pair, so a drift in machine speed cancels.
Quote the median ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
ENCODER_LINEARS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                   r"|intermediate\.dense|output\.dense)")


def build(method: str, phase: str, warmup: int):
    from _minilm import load_model, method_config

    import hypermerge as hm

    # reduce: a long schedule, masking every step; final: allocation ends during the warm-up steps.
    total, tinit, tfinal = (100_000, 0, 0) if phase == "reduce" else (warmup, 0, 0)
    model = load_model(0)
    if method == "peft-adalora":
        import peft

        config = peft.AdaLoraConfig(target_modules=ENCODER_LINEARS, init_r=12, target_r=8, lora_alpha=16,
                                    lora_dropout=0.0, tinit=tinit, tfinal=tfinal, deltaT=1, total_step=total,
                                    modules_to_save=["classifier"])
        model = peft.get_peft_model(model, config)

        def allocate(step: int) -> None:
            model.base_model.update_and_allocate(step)

        def regulariser():
            return 0.0  # PEFT adds it to outputs.loss inside forward
    else:
        # "adalora-unshrunk": AdaLoRA, but after the final allocation the layers keep computing
        # at init_r with the mask (what not shrinking the live modules would cost).
        unshrunk = method == "adalora-unshrunk"
        hm.inject(model, method_config("adalora" if unshrunk else method, init_r=12, target_r=8, total_steps=total,
                                       tinit=tinit, tfinal=tfinal, delta_t=1, alpha=16))

        def allocate(step: int) -> None:
            hm.allocate_ranks(model, step)
            if unshrunk:
                for layer in hm.adapter_layers(model).values():
                    layer.kept = None

        def regulariser():
            return hm.regularization_loss(model)
    return model, allocate, regulariser


def measure(method: str, phase: str, steps: int, warmup: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, allocate, regulariser = build(method, phase, warmup)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (16, 64), generator=generator),
             "attention_mask": torch.ones(16, 64, dtype=torch.long),
             "labels": torch.randint(0, 2, (16,), generator=generator)}
    model.train()
    times = []
    for step in range(1, warmup + steps + 1):
        start = time.perf_counter()
        loss = model(**batch).loss + regulariser()
        loss.backward()
        optimizer.step()
        allocate(step)
        optimizer.zero_grad(set_to_none=True)
        if step > warmup:
            times.append(time.perf_counter() - start)
    return {"method": method, "phase": phase, "median_ms": 1000 * statistics.median(times),
            "mean_ms": 1000 * statistics.fmean(times), "trainable_parameters": trainable,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(method: str, phase: str, steps: int, warmup: int) -> dict:
    command = [sys.executable, __file__, "--child", method, "--phase", phase, "--steps", str(steps),
               "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="adalora:peft-adalora,hyperadalora:adalora",
                        help="comma-separated A:B pairs; the ratio reported is A/B")
    parser.add_argument("--phases", default="reduce,final")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="reduce", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.phase, args.steps, args.warmup)))
        return
    results = []
    for phase in args.phases.split(","):
        for pair in args.pairs.split(","):
            a, b = pair.split(":")
            rows = []
            for _ in range(args.rounds):
                rows.append((run_child(a, phase, args.steps, args.warmup), run_child(b, phase, args.steps, args.warmup)))
            ratios = [ra["median_ms"] / rb["median_ms"] for ra, rb in rows]
            summary = {
                "phase": phase, "a": a, "b": b,
                "a_median_ms": statistics.median(r[0]["median_ms"] for r in rows),
                "b_median_ms": statistics.median(r[1]["median_ms"] for r in rows),
                "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                "a_peak_rss_mib": statistics.median(r[0]["peak_rss_mib"] for r in rows),
                "b_peak_rss_mib": statistics.median(r[1]["peak_rss_mib"] for r in rows),
                "a_trainable": rows[0][0]["trainable_parameters"], "b_trainable": rows[0][1]["trainable_parameters"],
            }
            results.append(summary)
            print(json.dumps(summary), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
