"""Convergence: HyperAdaLoRA vs AdaLoRA at equal rank budgets on MiniLM sentiment (one run per call).

    python benchmarks/convergence.py --method hyperadalora --seed 0 --steps 300 --lr 3e-3 --out runs/x.json

One plain training loop, identical for every method: AdamW (no weight decay), linear warm-up over
6% of the steps then linear decay to 0, batch 8, sequences cut at 48 tokens (99% of the sentences
are shorter than 55) and padded per batch, loss = cross-entropy + ``hm.regularization_loss``;
``hm.allocate_ranks`` after every optimizer step. Eval loss on the first 300 validation sentences
every ``--eval-every`` (20) steps. The seed fixes the
classifier's initialisation and the batch order (the same for every method); the adapter's own
initialisation follows from it too. Training time excludes evaluation.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from _minilm import evaluate, load_data, load_model, method_config, train_batches

import hypermerge as hm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=["adalora", "hyperadalora", "lora", "hyperlora"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--tinit", type=int, default=None, help="default: 10%% of the steps")
    parser.add_argument("--tfinal", type=int, default=None, help="default: 20%% of the steps")
    parser.add_argument("--delta-t", type=int, default=10)
    parser.add_argument("--hyper-dim", type=int, default=64)
    parser.add_argument("--hyper-depth", type=int, default=2)
    parser.add_argument("--hyper-heads", type=int, default=4)
    parser.add_argument("--readout-exp", type=float, default=0.5,
                        help="design variant: multiply the generated values by hyper_dim^-e (library: e = 0.5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default=None, help="name of this variant in the analysis (default: the method)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tinit = args.steps // 10 if args.tinit is None else args.tinit
    tfinal = args.steps // 5 if args.tfinal is None else args.tfinal
    data = load_data(args.max_length, args.eval_size)
    model = load_model(args.seed)
    hyper = dict(hyper_dim=args.hyper_dim, hyper_depth=args.hyper_depth, hyper_heads=args.hyper_heads)
    config = method_config(args.method, init_r=args.init_r, target_r=args.target_r, total_steps=args.steps,
                           tinit=tinit, tfinal=tfinal, delta_t=args.delta_t, alpha=args.alpha, hyper=hyper)
    torch.manual_seed(args.seed + 1000)  # the adapter's initialisation
    hm.inject(model, config)
    if args.method.startswith("hyper") and args.readout_exp != 0.5:
        _set_readout(model, args.method, args.readout_exp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, int(0.06 * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup))))
    batches = train_batches(data, args.batch, args.seed)

    record = {"method": args.method, "label": args.label or args.method, "seed": args.seed, "args": vars(args) | {"out": str(args.out)},
              "config": config.to_dict(), "trainable_parameters": hm.trainable_parameters(model),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{args.threads} thread(s)",
              "evals": [], "train_loss": []}
    loss0, acc0 = evaluate(model, data)
    record["evals"].append({"step": 0, "seconds": 0.0, "loss": loss0, "accuracy": acc0})
    model.train()
    train_seconds = 0.0
    for step in range(1, args.steps + 1):
        batch = next(batches)
        start = time.perf_counter()
        loss = model(**batch).loss
        (loss + hm.regularization_loss(model)).backward()
        optimizer.step()
        scheduler.step()
        hm.allocate_ranks(model, step)
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - start
        record["train_loss"].append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            eval_loss, accuracy = evaluate(model, data)
            record["evals"].append({"step": step, "seconds": train_seconds, "loss": eval_loss, "accuracy": accuracy})
            print(f"{args.method} seed {args.seed} step {step}: eval loss {eval_loss:.4f} acc {accuracy:.3f} "
                  f"({train_seconds:.0f} s)", flush=True)
    record["rank_pattern"] = hm.rank_pattern(model)
    record["train_seconds"] = train_seconds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


def _set_readout(model: torch.nn.Module, method: str, exponent: float) -> None:
    """Design variant: readout d^-e instead of 1/sqrt(d), head weights rescaled so the initial outputs are unchanged."""
    net = getattr(model, f"{method}_hypernetwork")
    dim = net.tokens.shape[1]
    new = dim ** -exponent
    with torch.no_grad():
        for heads in (net.col_heads, net.row_heads, net.scalar_heads or []):
            for head in heads:
                head.weight.mul_(net.readout / new)
    net.readout = new
    net.invalidate()


if __name__ == "__main__":
    main()
