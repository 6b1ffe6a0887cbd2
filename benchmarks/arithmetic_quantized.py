"""Exact match on built-in arithmetic questions, fp32 vs weight-only int4 / int8, ours vs onnxruntime-genai
(issue 16 item 1): what quantization costs a *trained* SmolLM2 adapter on its own task.

The model is a folded SmolLM2-135M adapter (``hypermerge fold`` output, e.g. of a
``benchmarks/convergence.py --task smollm2 --save-adapter DIR`` run). In one run:

- PyTorch fp32 (the folded HF directory, greedy ``generate``): the reference;
- ours fp32 / int4 / int8: ``hm.export_model`` of the folded directory (model.onnx) and the same
  weight-only quantizer ``hypermerge export --quantize int4|int8`` runs (MatMulNBits, blocks of 32,
  accuracy_level 4), decoded by ``hm.OnnxModel``'s KV-cache loop;
- peer fp32 / int4: ``python -m onnxruntime_genai.models.builder -i FOLDED -o OUT -p fp32|int4 -e cpu``,
  decoded by ``onnxruntime_genai.Generator``.

Each model answers the same questions greedily and may stop at EOS ("What is 47 plus 385? Answer:"), batch 1, up to
``--new-tokens`` tokens; the answer is the text before the first EOS, stripped, compared with the
label. Reported: exact match with a Wilson 95% interval, and how many answers equal PyTorch fp32's.

    python benchmarks/arithmetic_quantized.py FOLDED_DIR --questions 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_peer import Ours, Peer, build_peer  # noqa: E402

import hypermerge as hm  # noqa: E402
from hypermerge.export import quantize as wq  # noqa: E402
from hypermerge.export.onnx_export import load_torch_model  # noqa: E402
from hypermerge.training.data import arithmetic_splits  # noqa: E402


def build_ours(source: Path, work: Path, block_size: int, accuracy_level: int) -> Path:
    """model.onnx plus both weight-only files (written whether or not an export would keep them)."""
    out = work / "ours"
    if not (out / "model.onnx").exists():
        hm.export_model(source, out, overwrite=True, verify=False, progress=False)
    for bits, name in ((4, "model.int4.onnx"), (8, "model.int8.onnx")):
        if not (out / name).exists():
            wq.quantize_weight_only(out / "model.onnx", out / name, wq.WeightOnlyConfig(bits, block_size, accuracy_level))
    return out


def torch_answer(model, ids: np.ndarray, new_tokens: int, eos: int) -> np.ndarray:
    """Greedy, stopping at EOS (``torch_greedy`` of the parity check forces every token, EOS suppressed)."""
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=eos, eos_token_id=eos)
    return out[0, ids.shape[1]:].numpy()


def peer_answer(peer: Peer, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """onnxruntime-genai greedy, free to stop at EOS (``Peer.generate`` forces exactly new_tokens)."""
    params = peer.og.GeneratorParams(peer.model)
    params.set_search_options(do_sample=False, max_length=ids.shape[1] + new_tokens, batch_size=1)
    generator = peer.og.Generator(peer.model, params)
    generator.append_tokens(ids.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return np.asarray(generator.get_sequence(0))[ids.shape[1]:]


def answer_text(tokens: np.ndarray, tokenizer, eos: int) -> str:
    tokens = [int(t) for t in tokens]
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    return tokenizer.decode(tokens).strip()


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folded", type=Path, help="a folded SmolLM2 directory (hypermerge fold output)")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--work", type=Path, required=True, help="where the exports are built (reused)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours = build_ours(args.folded, args.work, args.block_size, args.accuracy_level)
    models = {"ours fp32": Ours(ours, "model.onnx", args.threads),
              "ours int4": Ours(ours, "model.int4.onnx", args.threads),
              "ours int8": Ours(ours, "model.int8.onnx", args.threads),
              "peer fp32": Peer(build_peer(args.folded, args.work, "fp32"), args.threads),
              "peer int4": Peer(build_peer(args.folded, args.work, "int4"), args.threads)}
    tokenizer = models["ours fp32"].model.tokenizer
    eos = tokenizer.eos_token_id
    torch_model = load_torch_model(args.folded, "causal-lm")
    questions = arithmetic_splits(test_size=args.questions)["test"]

    answers: dict[str, list[str]] = {"torch fp32": [], **{name: [] for name in models}}
    seconds = dict.fromkeys(answers, 0.0)
    for question in questions:
        ids = np.asarray(tokenizer(question.text)["input_ids"], np.int64)[None]
        start = time.perf_counter()
        tokens = torch_answer(torch_model, ids, args.new_tokens, eos)
        seconds["torch fp32"] += time.perf_counter() - start
        answers["torch fp32"].append(answer_text(tokens, tokenizer, eos))
        for name, model in models.items():
            start = time.perf_counter()
            tokens = (peer_answer(model, ids, args.new_tokens) if isinstance(model, Peer)
                      else model.generate(ids, args.new_tokens)[0])
            seconds[name] += time.perf_counter() - start
            answers[name].append(answer_text(tokens, tokenizer, eos))

    labels = [q.label.strip() for q in questions]
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "folded": str(args.folded), "questions": len(questions), "new_tokens": args.new_tokens,
               "models": {}}
    for name, texts in answers.items():
        hits = sum(a == b for a, b in zip(texts, labels, strict=True))
        same = sum(a == b for a, b in zip(texts, answers["torch fp32"], strict=True))
        low, high = wilson(hits, len(labels))
        results["models"][name] = {"exact_match": hits / len(labels), "exact_match_ci95": [low, high],
                                   "same_answer_as_torch": same / len(labels), "seconds": seconds[name],
                                   "examples": texts[:5]}
        print(f"{name}: exact match {hits}/{len(labels)} = {hits / len(labels):.3f} [{low:.3f}, {high:.3f}], "
              f"same answer as torch fp32 {same}/{len(labels)}, {seconds[name]:.1f} s", flush=True)
    results["labels"] = labels[:5]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
