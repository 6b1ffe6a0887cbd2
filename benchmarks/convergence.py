"""Convergence: HyperAdaLoRA vs AdaLoRA at equal rank budgets, one run per call (issue 14).

    python benchmarks/convergence.py --task minilm --method hyperadalora --seed 0 --lr 3e-3 \\
        --out benchmarks/results/conv_minilm_hyperadalora_lr3e-3_s0.json

One plain training loop, identical for every method: AdamW (no weight decay), linear warm-up over
6% of the steps then linear decay to 0, loss = task loss + ``hm.regularization_loss``,
``hm.allocate_ranks(model, step)`` after every optimizer step (step = optimizer steps taken). The
seed fixes the batch order and the adapter's initialisation; tasks are in ``convergence_tasks.py``
(MiniLM: a frozen linear-probe head; SmolLM2: completion-only loss). Recorded: the task loss of
every step (regulariser excluded), the eval loss / accuracy on a small curve subset every
``--eval-every`` steps, the final loss and accuracy (exact match) on >= 1,000 held-out examples
(per example, for intervals and paired tests), per-step seconds, the rank pattern and, at every
allocation, how many components were pruned and how many came back (mask churn). Training time
excludes evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from convergence_tasks import TASKS, summary

import hypermerge as hm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--method", required=True, choices=["adalora", "hyperadalora"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8, help="= init_r: no pruning (ablation)")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--tinit", type=int, default=None, help="default: 20%% of the steps")
    parser.add_argument("--tfinal", type=int, default=None, help="default: 20%% of the steps")
    parser.add_argument("--delta-t", type=int, default=10)
    parser.add_argument("--orth-reg-weight", type=float, default=0.5)
    parser.add_argument("--hyper-dim", type=int, default=64)
    parser.add_argument("--hyper-depth", type=int, default=2)
    parser.add_argument("--hyper-heads", type=int, default=4)
    parser.add_argument("--hyper-matrix-rank", type=int, default=None, help="default: the library's")
    parser.add_argument("--hyper-lambda-init", default=None, choices=["offset", "zero"])
    parser.add_argument("--hyper-prune-reset", default=None, choices=["on", "off"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default=None, help="name of this variant in the analysis (default: the method)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-adapter", type=Path, default=None,
                        help="also write the trained adapter (hm.save_adapter), for fold / export / serve")
    return parser.parse_args()


def build_config(args: argparse.Namespace, extra: dict) -> hm.AdapterConfig:
    schedule = dict(init_r=args.init_r, target_r=args.target_r, total_steps=args.steps, alpha=args.alpha,
                    tinit=args.steps // 5 if args.tinit is None else args.tinit,
                    tfinal=args.steps // 5 if args.tfinal is None else args.tfinal,
                    delta_t=args.delta_t, orth_reg_weight=args.orth_reg_weight, **extra)
    if args.method == "adalora":
        return hm.AdaLoRAConfig(**schedule)
    hyper = dict(hyper_dim=args.hyper_dim, hyper_depth=args.hyper_depth, hyper_heads=args.hyper_heads)
    if args.hyper_matrix_rank is not None:
        hyper["hyper_matrix_rank"] = args.hyper_matrix_rank
    if args.hyper_lambda_init is not None:
        hyper["hyper_lambda_init"] = args.hyper_lambda_init
    if args.hyper_prune_reset is not None:
        hyper["hyper_prune_reset"] = args.hyper_prune_reset == "on"
    return hm.HyperAdaLoRAConfig(**schedule, **hyper)


def keep_mask(model: torch.nn.Module, method: str) -> torch.Tensor:
    """Every rank component's keep flag, concatenated (for counting mask flips)."""
    if method == "hyperadalora":
        return model.hyperadalora_hypernetwork.mask.clone()
    return torch.cat([layer.rank_mask for layer in hm.adapter_layers(model).values()]).clone()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]()
    if args.save_adapter is not None and task.base is None:
        raise SystemExit(f"--save-adapter: the {args.task} task's model is not its packaged base (a probe head)")
    model = task.load_model()
    config = build_config(args, task.adapter_extra)
    torch.manual_seed(args.seed + 1000)  # the adapter's initialisation
    hm.inject(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, int(0.06 * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup))))
    batches = task.train_batches(args.batch, args.seed)

    record = {"task": args.task, "method": args.method, "label": args.label or args.method, "seed": args.seed,
              "lr": args.lr, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "config": config.to_dict(),
              "trainable_parameters": hm.trainable_parameters(model),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f} at start",
              "evals": [], "train_loss": [], "step_seconds": [], "churn": []}
    losses, correct = task.per_example(model, task.curve)
    record["evals"].append({"step": 0, "seconds": 0.0, **_curve_point(losses, correct)})
    model.train()
    train_seconds = 0.0
    mask = keep_mask(model, args.method)
    for step in range(1, args.steps + 1):
        batch = next(batches)
        start = time.perf_counter()
        loss = model(**batch).loss
        (loss + hm.regularization_loss(model)).backward()
        optimizer.step()
        scheduler.step()
        hm.allocate_ranks(model, step)
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        record["step_seconds"].append(round(seconds, 4))
        record["train_loss"].append(round(loss.item(), 6))
        new_mask = keep_mask(model, args.method)
        if not torch.equal(new_mask, mask):
            record["churn"].append({"step": step, "pruned": int((mask & ~new_mask).sum()),
                                    "restored": int((~mask & new_mask).sum()), "kept": int(new_mask.sum())})
        mask = new_mask
        if step % args.eval_every == 0 or step == args.steps:
            losses, correct = task.per_example(model, task.curve)
            point = {"step": step, "seconds": train_seconds, **_curve_point(losses, correct)}
            record["evals"].append(point)
            print(f"{args.task} {record['label']} lr {args.lr:g} seed {args.seed} step {step}: eval loss "
                  f"{point['loss']:.4f} acc {point['accuracy']:.3f} ({train_seconds:.0f} s)", flush=True)
    losses, correct = task.per_example(model, task.final)
    record["final"] = summary(losses, correct)
    record["final_per_example"] = {"loss": [round(x, 5) for x in losses], "correct": [int(c) for c in correct]}
    record["rank_pattern"] = hm.rank_pattern(model)
    record["train_seconds"] = train_seconds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record) + "\n")
    if args.save_adapter is not None:
        hm.save_adapter(model, args.save_adapter, base_model=task.base)
    print(f"final: {json.dumps(record['final'])}", flush=True)


def _curve_point(losses: list[float], correct: list[bool]) -> dict:
    return {"loss": sum(losses) / len(losses), "accuracy": sum(correct) / len(correct)}


if __name__ == "__main__":
    main()
