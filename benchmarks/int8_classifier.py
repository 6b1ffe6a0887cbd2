"""int8 on a real trained classifier: the folded output of ``train/minilm-sentiment-hyperadapt.yaml``.

On the 1,043-sentence test split of the built-in sentiment set: accuracy of fp32 and of each int8
variant, their top-1 agreement with fp32, and latency at batch 8 × seq 64 against the fp32 ONNX
model and PyTorch eager, interleaved in the same run (same threads).

Variants (each keeps model.onnx fp32 and writes its own file):
- dynamic: what ``hypermerge export --quantize int8`` writes first (weights int8 per channel,
  activations uint8 at run time, attention matmuls fp32);
- dynamic, MLP down-projections fp32: the export's fallback when the first misses the bound;
- static QDQ: weights int8 per channel, activations int8 with ranges calibrated on 256 training
  sentences (onnxruntime ``quantize_static``, MinMax), attention matmuls fp32;
- static QDQ, MLP down-projections fp32;
- weight-only int8: onnxruntime ``MatMulNBits`` (what ``--quantize int8`` writes for causal LMs),
  weights int8 in blocks of 32 (or 128) along the input dimension, each with its own scale, activations
  quantized per block inside the kernel (``accuracy_level`` 4), attention matmuls fp32.

    hypermerge train train/minilm-sentiment-hyperadapt.yaml
    hypermerge fold --adapter runs/minilm-sentiment-hyperadapt/adapter --out runs/minilm-sentiment-folded
    python benchmarks/int8_classifier.py runs/minilm-sentiment-folded [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypermerge as hm  # noqa: E402
from hypermerge.export import optimize as opt  # noqa: E402
from hypermerge.export.latency import interleaved  # noqa: E402
from hypermerge.export.onnx_export import load_torch_model  # noqa: E402
from hypermerge.export.ort import open_session  # noqa: E402
from hypermerge.export.quantize import WeightOnlyConfig, quantize_weight_only  # noqa: E402
from hypermerge.training.data import sentiment_splits  # noqa: E402

CALIBRATION_SENTENCES = 256


def static_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], keep_fp32: list[str]) -> None:
    """Static QDQ int8: activation ranges from ``feeds`` (MinMax), weights per channel."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    with opt.silenced():
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep_fp32,
                        extra_options={"MatMulConstBOnly": True})


def encode(tokenizer, texts: list[str], batch: int = 32) -> list[dict[str, np.ndarray]]:
    out = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=64, return_tensors="np")
        out.append({name: enc[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def predictions(session, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([session.run(["logits"], feeds)[0].argmax(-1) for feeds in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folded", type=Path, help="the folded classifier (hypermerge fold's output)")
    parser.add_argument("--work", type=Path, default=None, help="where the exports go [default: FOLDED-int8-bench]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or args.folded.with_name(args.folded.name + "-int8-bench")
    if not (work / "model.onnx").exists():
        hm.export_model(args.folded, work, verify=False, progress=False, overwrite=True)
    fp32_path = work / "model.onnx"
    tokenizer = hm.OnnxModel.load(work, provider="cpu", threads=args.threads).tokenizer
    splits = sentiment_splits()
    test = splits["test"]
    labels = np.asarray([example.label for example in test])
    batches = encode(tokenizer, [example.text for example in test])
    calibration = encode(tokenizer, [example.text for example in splits["train"][:CALIBRATION_SENTENCES]], batch=8)
    down = opt.ffn_down_nodes(fp32_path)

    files = {"dynamic int8": work / "dynamic.onnx", "dynamic int8, MLP down fp32": work / "dynamic-down-fp32.onnx",
             "static int8 (QDQ)": work / "static.onnx", "static int8 (QDQ), MLP down fp32": work / "static-down-fp32.onnx",
             "weight-only int8, blocks of 32": work / "weight-only-32.onnx",
             "weight-only int8, blocks of 128": work / "weight-only-128.onnx"}
    opt.quantize_int8(fp32_path, files["dynamic int8"])
    opt.quantize_int8(fp32_path, files["dynamic int8, MLP down fp32"], keep_fp32=down)
    static_int8(fp32_path, files["static int8 (QDQ)"], calibration, [])
    static_int8(fp32_path, files["static int8 (QDQ), MLP down fp32"], calibration, down)
    for block in (32, 128):
        quantize_weight_only(fp32_path, files[f"weight-only int8, blocks of {block}"],
                             WeightOnlyConfig(bits=8, block_size=block, accuracy_level=4))

    sessions = {"fp32": open_session(fp32_path, "cpu", args.threads)}
    sessions.update({name: open_session(path, "cpu", args.threads) for name, path in files.items()})
    reference = predictions(sessions["fp32"], batches)
    accuracy = {}
    for name, session in sessions.items():
        predicted = reference if name == "fp32" else predictions(session, batches)
        accuracy[name] = {"accuracy": float((predicted == labels).mean()),
                          "agreement_with_fp32": float((predicted == reference).mean())}

    # latency: batch 8 × seq 64 of real sentences (padded / truncated to 64), torch eager included
    enc = tokenizer([example.text for example in test[:8]], padding="max_length", truncation=True, max_length=64,
                    return_tensors="np")
    feeds = {name: enc[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
    model = load_torch_model(args.folded, "sequence-classification")
    tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}
    functions = {"torch eager": lambda: model(**tensors)}
    functions.update({name: (lambda s=session: s.run(["logits"], feeds)) for name, session in sessions.items()})
    with torch.no_grad():
        latency = interleaved(functions, iters=args.iters)
    table = {}
    for name in sessions:
        p50 = latency[name]["p50_ms"]
        table[name] = {**accuracy[name], "p50_ms": p50, "vs_fp32": p50 / latency["fp32"]["p50_ms"],
                       "vs_torch": p50 / latency["torch eager"]["p50_ms"]}
    result = {"test_sentences": len(test), "threads": args.threads, "shape": "b8 x s64", "iters": args.iters,
              "torch_eager_p50_ms": latency["torch eager"]["p50_ms"], "fp32_matmuls_kept": len(down),
              "variants": table}
    print(f"torch eager p50 {latency['torch eager']['p50_ms']:.1f} ms")
    for name, row in table.items():
        print(f"{name:36s} acc {row['accuracy']:.4f}  agree {row['agreement_with_fp32']:.4f}  p50 {row['p50_ms']:.1f} ms"
              f"  {row['vs_fp32']:.2f}× fp32  {row['vs_torch']:.2f}× torch")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
