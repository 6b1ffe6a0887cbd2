"""Training methods compared on the MiniLM sentiment recipe: trainable values, step time, peak
memory, and eval accuracy after the same number of steps.

    python benchmarks/train_methods.py                    # the table in benchmarks/RESULTS.md
    python benchmarks/train_methods.py --steps 100 --timing-steps 20 --methods hyperadapt peft-ia3

Rows: ours (HyperAdapt, LoRA r=8, full fine-tune) run through ``hm.train`` itself; the PEFT peers
(LoRA r=8 on the same layers, IA³ with PEFT's defaults for BERT) run on the same data, batches
(b16 x s64: every batch padded to 64 tokens), Trainer settings and step timer, their model
wrapped by ``peft.get_peft_model`` instead of ``hm.inject``. Every run is a fresh process.

Two phases:
* timing (``--timing-steps``): every method's model built in one process and stepped in turn,
  one step each, round after round, on the same b16 x s64 batches of the recipe's data (forward,
  backward, gradient clipping, fused AdamW: the Trainer's default optimizer): a drift in the
  machine's speed hits every method alike. The table gives each method's median step time and its
  median paired ratio to PEFT's IA³ and LoRA (ratios of steps taken in the same round);
* accuracy (``--steps``): one fresh process per method runs the real thing (``hm.train``, or the
  same Trainer pipeline around a PEFT model) and reports eval accuracy on the 1,000 validation
  sentences, the Trainer-timed median step, and peak memory (process peak RSS on the CPU, CUDA
  max allocated on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # method -> the recipe whose data and training settings it runs with
    "hyperadapt": "minilm-sentiment-hyperadapt",
    "lora": "minilm-sentiment-lora",
    "adalora": "minilm-sentiment-adalora",
    "hyperadalora": "minilm-sentiment-hyperadalora",
    "full": "minilm-sentiment-full",
    "peft-lora": "minilm-sentiment-lora",
    "peft-adalora": "minilm-sentiment-adalora",
    "peft-ia3": "minilm-sentiment-hyperadapt",  # HyperAdapt's closest relative: its learning rate
}
LABELS = {
    "hyperadapt": "HyperAdapt (hypermerge)",
    "lora": "LoRA r=8 (hypermerge)",
    "adalora": "AdaLoRA r 12→8 (hypermerge)",
    "hyperadalora": "HyperAdaLoRA r 12→8 (hypermerge)",
    "full": "full fine-tune",
    "peft-lora": "LoRA r=8 (PEFT 0.21)",
    "peft-adalora": "AdaLoRA r 12→8 (PEFT 0.21)",
    "peft-ia3": "IA³ (PEFT 0.21)",
}
# b16 x s64, no checkpoints, one evaluation at the end
COMMON = ["data.padding=max_length", "data.max_length=64", "training.batch_size=16", "training.save_steps=null",
          "training.eval_steps=null", "training.logging_steps=10"]


def run_one(method: str, steps: int, out: Path) -> dict:
    """Train one method in this process; return its figures."""
    import hypermerge as hm

    recipe_path = ROOT / "train" / f"{RECIPES[method]}.yaml"
    overrides = list(COMMON) + schedule_overrides(method, steps)
    if not method.startswith("peft-"):
        result = hm.train(recipe_path, output_dir=out, max_steps=steps, overrides=overrides, quiet=True, overwrite=True)
        metrics = result.metrics
    else:
        metrics = run_peft(method, recipe_path, steps, overrides, out)
    return {k: metrics[k] for k in ("trainable_parameters", "step_time_ms", "peak_memory_mib", "peak_memory_kind",
                                    "eval_accuracy", "eval_loss", "steps", "device", "precision")}


def allocates(method: str) -> bool:
    return "adalora" in method


def schedule_overrides(method: str, steps: int) -> list[str]:
    """AdaLoRA's schedule scaled to the run, as the recipe's (10% at full rank, the last 20% final)."""
    return [f"adapter.tinit={steps // 10}", f"adapter.tfinal={steps // 5}"] if allocates(method) else []


def run_peft(method: str, recipe_path: Path, steps: int, overrides: list[str], out: Path) -> dict:
    """The same pipeline as ``hm.train`` with the model wrapped by PEFT."""
    import transformers

    from hypermerge.training import launch, tasks
    from hypermerge.training import metrics as run_metrics
    from hypermerge.training import trainer as hm_trainer
    from hypermerge.training.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides, max_steps=steps)
    device, precision = launch.device_and_precision(recipe)
    tokenizer = tasks.load_tokenizer(recipe.model.resolve())
    data = tasks.build_data(recipe, tokenizer)
    model, params = build_model(method, recipe, data, tokenizer, steps)
    args = launch.training_arguments(recipe, out / "checkpoints", device=device, precision=precision, world=1,
                                          per_device=recipe.training.batch_size, scored=True, has_eval=True, quiet=True)
    timer = hm_trainer.StepTimer()
    callbacks = [timer] + ([PeftAllocation(model)] if method == "peft-adalora" else [])
    trainer = hm_trainer.HypermergeTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
        compute_metrics=tasks.accuracy, preprocess_logits_for_metrics=tasks.argmax_logits, callbacks=callbacks)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.model_accepts_loss_kwargs = False  # as hm.train does for classification
    run_metrics.reset_peak_memory(device)
    trainer.train()
    evaluation = trainer.evaluate()
    memory, memory_kind = run_metrics.peak_memory(device)
    steady = timer.seconds[2:] if len(timer.seconds) > 4 else timer.seconds
    return {
        "trainable_parameters": sum(p.numel() for p in params),
        "step_time_ms": statistics.median(steady) * 1000,
        "peak_memory_mib": memory, "peak_memory_kind": memory_kind,
        "eval_accuracy": evaluation.get("eval_accuracy"), "eval_loss": evaluation.get("eval_loss"),
        "steps": trainer.state.global_step, "device": device, "precision": precision,
    }


class PeftAllocation(transformers.TrainerCallback):
    """What a PEFT AdaLoRA user must add by hand: update_and_allocate after every optimizer step."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


def build_model(method: str, recipe, data, tokenizer, steps: int):
    """The recipe's model wrapped for ``method``, and its trainable parameters."""
    import peft
    import transformers

    import hypermerge as hm
    from hypermerge.training import tasks

    base = recipe.model.resolve()
    transformers.set_seed(recipe.training.seed)
    model, new_modules = tasks.load_model(recipe, base, data.label_names, tokenizer)
    transformers.set_seed(recipe.training.seed)
    if method == "peft-lora":
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
            target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)"))
    elif method == "peft-ia3":
        model = peft.get_peft_model(model, peft.IA3Config(task_type="SEQ_CLS"))
    elif method == "peft-adalora":
        options = recipe.adapter.options
        model = peft.get_peft_model(model, peft.AdaLoraConfig(
            task_type="SEQ_CLS", init_r=options["init_r"], target_r=options["target_r"], tinit=options["tinit"],
            tfinal=options["tfinal"], deltaT=options["delta_t"], lora_alpha=options["alpha"], lora_dropout=0.0,
            total_step=steps, target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)"))
    elif method != "full":
        hm.inject(model, recipe.adapter.build_config(total_steps=steps, modules_to_save=new_modules))
    return model.train(), [p for p in model.parameters() if p.requires_grad]


def timing(methods: list[str], steps: int) -> dict[str, dict]:
    """Median step time per method and paired ratios, the methods stepped in turn (see the docstring)."""
    import torch

    import hypermerge as hm
    from hypermerge.training import tasks
    from hypermerge.training.recipe import load_recipe

    models, optimizers, batches = {}, {}, None
    for method in methods:
        recipe = load_recipe(ROOT / "train" / f"{RECIPES[method]}.yaml", COMMON + schedule_overrides(method, steps))
        if batches is None:
            tokenizer = tasks.load_tokenizer(recipe.model.resolve())
            data = tasks.build_data(recipe, tokenizer)
            batches = [data.collator([data.train[i] for i in range(16 * k, 16 * k + 16)]) for k in range(8)]
        models[method], params = build_model(method, recipe, data, tokenizer, steps)
        optimizers[method] = torch.optim.AdamW(params, lr=recipe.training.learning_rate, fused=True)
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for step in range(steps):
        batch = batches[step % len(batches)]
        for method in methods[step % len(methods):] + methods[:step % len(methods)]:
            model, optimizer = models[method], optimizers[method]
            started = time.perf_counter()
            loss = model(**batch).loss  # PEFT's AdaLoRA adds its orthogonality term inside forward
            if allocates(method) and not method.startswith("peft-"):
                loss = loss + hm.regularization_loss(model)  # as hm.train's compute_loss does
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            if method == "peft-adalora":
                model.base_model.update_and_allocate(step)
            elif allocates(method):
                hm.allocate_ranks(model, step)
            optimizer.zero_grad()
            seconds[method].append(time.perf_counter() - started)
    warm = 2  # the first steps allocate the optimizer state
    results = {}
    for method in methods:
        own = seconds[method][warm:]
        results[method] = {"step_ms": statistics.median(own) * 1000, "spread_ms": [min(own) * 1000, max(own) * 1000]}
        for peer in ("peft-ia3", "peft-lora", "peft-adalora"):
            if peer in seconds:
                results[method][f"vs_{peer}"] = statistics.median(
                    a / b for a, b in zip(own, seconds[peer][warm:], strict=True))
    return results


def spawn(method: str, steps: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="hm-bench-") as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--one", method, "--steps", str(steps), "--result", str(result),
                   "--workdir", tmp]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{method} failed:\n{done.stderr[-4000:]}")
        return json.loads(result.read_text())


def table(results: dict, steps: int) -> str:
    rows = ["| method | trainable values | step (ms, interleaved) | ÷ PEFT IA³ | ÷ PEFT LoRA | ÷ PEFT AdaLoRA | "
            f"step in the Trainer (ms) | peak memory (MiB) | eval accuracy after {steps} steps |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, fmt):
        return "" if value is None else format(value, fmt)

    for method, figures in results.items():
        timed = figures.get("timing", {})
        accuracy = figures.get("eval_accuracy")
        rows.append(" | ".join([
            f"| {LABELS[method]}", cell(figures.get("trainable_parameters"), ","), cell(timed.get("step_ms"), ".0f"),
            cell(timed.get("vs_peft-ia3"), ".2f"), cell(timed.get("vs_peft-lora"), ".2f"),
            cell(timed.get("vs_peft-adalora"), ".2f"),
            cell(figures.get("step_time_ms"), ".0f"), cell(figures.get("peak_memory_mib"), ".0f"),
            "" if accuracy is None else f"{100 * accuracy:.1f}% |"]))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=500, help="steps of the accuracy runs (0: skip them)")
    parser.add_argument("--timing-steps", type=int, default=30, help="interleaved steps per method (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (OMP_NUM_THREADS) everywhere")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        args.result.write_text(json.dumps(run_one(args.one, args.steps, args.workdir / "run")))
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M")
    results: dict[str, dict] = {m: {} for m in args.methods}
    if args.timing_steps:
        for method, figures in timing(args.methods, args.timing_steps).items():
            results[method]["timing"] = figures
            print(f"timing   {method:11s} {figures['step_ms']:7.1f} ms/step", flush=True)
    for method in args.methods if args.steps else []:
        figures = spawn(method, args.steps, threads=args.threads)
        results[method].update(figures)
        print(f"accuracy {method:11s} {figures['eval_accuracy']:.4f} after {figures['steps']} steps, "
              f"{figures['step_time_ms']:.0f} ms/step, peak {figures['peak_memory_mib']:.0f} MiB", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    print(f"\n{device}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"started {started}\n")
    print(table(results, args.steps))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
