"""Which weight matmuls cost a trained classifier its int8 answers: dynamic int8 with one matmul at a
time kept in fp32, then the k worst kept in fp32 together (issue 16, item 2).

For each constant-weight MatMul of the fp32 export: top-1 agreement with fp32 on the ``--rank-on``
split of the built-in sentiment set (the 1,000 validation sentences by default: ranking on the test
sentences would choose for the very sentences it is judged on) when that one matmul stays fp32 (the
gain over full dynamic int8 is its cost); then agreement and accuracy on the 1,043 test sentences, and
latency (b8 x s64, interleaved with fp32), of keeping the k costliest in fp32, for k in --keep.

    python benchmarks/int8_sensitivity.py FOLDED [--rank-on validation|test] [--keep 2 4 6 8] [--json out.json]

FOLDED is the folded classifier (see benchmarks/int8_classifier.py); its fp32 export is reused from
FOLDED-int8-bench if int8_classifier.py made one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int8_classifier import encode, predictions  # noqa: E402

import hypermerge as hm  # noqa: E402
from hypermerge.export import optimize as opt  # noqa: E402
from hypermerge.export.latency import interleaved  # noqa: E402
from hypermerge.export.ort import open_session  # noqa: E402
from hypermerge.training.data import sentiment_splits  # noqa: E402


def weight_matmuls(path: Path) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer} | {
        out for node in graph.node if node.op_type == "Constant" for out in node.output}
    constants |= {node.output[0] for node in graph.node if node.op_type == "Transpose" and node.input[0] in constants}
    # only MatMuls with a constant weight: the quantizer leaves the attention matmuls fp32 anyway
    return [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in constants]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folded", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--rank-on", choices=["validation", "test"], default="validation")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.folded.with_name(args.folded.name + "-int8-bench")
    if not (work / "model.onnx").exists():
        hm.export_model(args.folded, work, verify=False, progress=False, overwrite=True)
    fp32_path, trial = work / "model.onnx", work / "sensitivity.onnx"
    tokenizer = hm.OnnxModel.load(work, provider="cpu", threads=args.threads).tokenizer
    splits = sentiment_splits()
    fp32 = open_session(fp32_path, "cpu", args.threads)
    sets = {}
    for split in {args.rank_on, "test"}:
        batches = encode(tokenizer, [example.text for example in splits[split]])
        sets[split] = (batches, predictions(fp32, batches), np.asarray([example.label for example in splits[split]]))
    test = splits["test"]

    def agreement(keep: list[str], split: str, path: Path = trial) -> tuple[float, float]:
        batches, reference, labels = sets[split]
        opt.quantize_int8(fp32_path, path, keep_fp32=keep)
        predicted = predictions(open_session(path, "cpu", args.threads), batches)
        return float((predicted == reference).mean()), float((predicted == labels).mean())

    full, _ = agreement([], args.rank_on)
    full_test = agreement([], "test")[0] if args.rank_on != "test" else full
    candidates = [name for name in weight_matmuls(fp32_path)]
    gains = {}
    for i, name in enumerate(candidates):
        gains[name] = agreement([name], args.rank_on)[0] - full
        print(f"[{i + 1}/{len(candidates)}] {name}: agreement {full + gains[name]:.4f} ({gains[name]:+.4f})", flush=True)
    ranked = sorted(candidates, key=lambda name: -gains[name])
    rows, sessions = {}, {"fp32": open_session(fp32_path, "cpu", args.threads)}
    for k in args.keep:
        path = work / f"dynamic-keep{k}.onnx"
        agree, accuracy = agreement(ranked[:k], "test", path)
        rows[k] = {"kept_fp32": ranked[:k], "agreement_with_fp32": agree, "accuracy": accuracy}
        sessions[f"keep {k}"] = open_session(path, "cpu", args.threads)
    enc = tokenizer([example.text for example in test[:8]], padding="max_length", truncation=True, max_length=64,
                    return_tensors="np")
    feeds = {name: enc[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
    latency = interleaved({name: (lambda s=s: s.run(["logits"], feeds)) for name, s in sessions.items()},
                          iters=args.iters)
    _, reference, labels = sets["test"]
    fp32_accuracy = float((reference == labels).mean())
    print(f"ranked on {args.rank_on}; test: fp32 accuracy {fp32_accuracy:.4f}, full dynamic int8 agreement {full_test:.4f}")
    for k, row in rows.items():
        row["vs_fp32"] = latency[f"keep {k}"]["p50_ms"] / latency["fp32"]["p50_ms"]
        print(f"keep {k} fp32: agreement {row['agreement_with_fp32']:.4f}  accuracy {row['accuracy']:.4f}  "
              f"{row['vs_fp32']:.2f}x fp32  ({', '.join(row['kept_fp32'])})")
    if args.json:
        args.json.write_text(json.dumps({"ranked_on": args.rank_on, "fp32_accuracy": fp32_accuracy,
                                         "full_dynamic_agreement": full_test, "gain_per_matmul": gains, "keep": rows,
                                         "fp32_p50_ms": latency["fp32"]["p50_ms"]}, indent=2))


if __name__ == "__main__":
    main()
