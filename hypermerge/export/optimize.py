"""``--optimize`` (onnxruntime's transformer optimizer) and ``--quantize int8`` (dynamic quantization).

Both write a new file beside ``model.onnx``; the caller re-checks parity (optimize) or measures the
accuracy cost (int8) before anything replaces or joins the fp32 model.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import re
from pathlib import Path

import numpy as np
import torch

from hypermerge.errors import ExportError
from hypermerge.export.onnx_export import call_wrapper, example_inputs, position_ids_for
from hypermerge.export.runtime import Runner, mean_pool
from hypermerge.export.tasks import CAUSAL_LM, FEATURE_EXTRACTION, IOContract

# the optimizer's fusion families: BERT-style encoders, GPT-2-style decoders
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet", "deberta-v2"}
# decoders with RMSNorm, RoPE and grouped KV heads (Llama's block): onnxruntime's "qwen3" set is its
# named set for them (no embedding-LayerNorm fusion, no mask format assumed); on our exports it turns
# the Pow/ReduceMean/Sqrt/Reciprocal/Mul norms (and the residual Add before them) into
# (Skip)SimplifiedLayerNormalization, as its "gpt2" set also does; neither fuses the attention, which
# decoder_fusion then rewrites
RMSNORM_DECODER_TYPES = {"llama", "mistral", "qwen2", "qwen3"}

# what int8 must keep to be kept (the bounds): mean embedding cosine, or top-1 agreement
INT8_BOUNDS = {FEATURE_EXTRACTION: ("cosine_mean", 0.99), "sequence-classification": ("top1_agreement", 0.99),
               CAUSAL_LM: ("top1_agreement", 0.99)}

# varied English for the int8 accuracy check when the export has a tokenizer
SENTENCES = [
    "A gripping, beautifully acted film.", "The plot never comes together and the jokes fall flat.",
    "I would watch it again tomorrow.", "Two hours of my life I will not get back.",
    "The soundtrack is the best thing about it.", "Quietly devastating and very funny at the same time.",
    "The capital of France is Paris.", "Adapters fold into dense weights without any runtime cost.",
    "Please send the invoice by Friday.", "Stir the sauce until it thickens, then season to taste.",
    "The committee postponed its decision until next spring.", "He missed the bus and walked home in the rain.",
    "Rates rose for the third quarter in a row.", "Her first novel was translated into twelve languages.",
    "This phone's battery barely lasts a day.", "The hotel staff were friendly and the room was spotless.",
    "Photosynthesis turns light into chemical energy.", "The match was cancelled because of the storm.",
    "An uneven but often brilliant debut.", "Nothing about this product works as advertised.",
    "def add(a, b): return a + b", "The quick brown fox jumps over the lazy dog.",
    "Our flight was delayed by six hours.", "What a waste of a talented cast.",
    "The museum opens at nine on weekdays.", "Short.", "Absolutely loved every minute of it!",
    "The instructions were confusing and incomplete.", "A river runs through the middle of the old town.",
    "The defence rested its case on Tuesday.", "Mix two parts sand with one part cement.",
    "It is neither good enough to recommend nor bad enough to enjoy.",
]


@contextlib.contextmanager
def silenced() -> None:
    """The optimizer and quantizer log and print freely; keep the CLI's output ours."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def fusion_family(config: dict) -> str:
    """The optimizer's ``model_type`` whose fusions match this architecture's export."""
    kind = config.get("model_type")
    if kind in ENCODER_TYPES:
        return "bert"
    return "qwen3" if kind in RMSNORM_DECODER_TYPES else "gpt2"


def optimize_onnx(src: Path, dst: Path, config: dict, *, external_data: bool = False, attention: bool = True) -> dict:
    """Run onnxruntime's transformer optimizer (attention / LayerNorm / GELU fusions) on ``src``.

    On Llama-family decoders the attention is then rewritten into GroupQueryAttention
    (:mod:`hypermerge.export.decoder_fusion`; ``attention=False`` skips it: its kernels are
    onnxruntime-CPU's for float32).

    Returns:
        ``{"model_type", "fused_ops": {op: count}}`` (only the fusions that happened).

    Raises:
        ExportError: the optimizer failed.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    text = config.get("text_config") or config
    model_type = fusion_family(config)
    heads = int(text.get("num_attention_heads") or text.get("n_head") or 0)
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    try:
        with silenced():
            # opt_level 0: only the fusions, which every execution provider runs; onnxruntime applies
            # its own graph optimisations when it loads the model for the provider at hand
            optimized = optimize_model(str(src), model_type=model_type, num_heads=heads, hidden_size=hidden,
                                       opt_level=0)
            fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
            if attention and model_type == "qwen3":
                fused.update(fuse_decoder_attention(optimized.model, config))
            optimized.save_model_to_file(str(dst), use_external_data_format=external_data)
    except Exception as exc:  # the optimizer raises anything from KeyError to onnx errors
        raise ExportError(f"onnxruntime's transformer optimizer failed ({type(exc).__name__}: {exc})", path=src,
                          hint="export without --optimize") from exc
    return {"model_type": model_type, "fused_ops": fused}


def fuse_decoder_attention(model, config: dict) -> dict[str, int]:
    """GroupQueryAttention + RotaryEmbedding in place of each layer's attention, where the graph allows."""
    from onnx import helper

    from hypermerge.export.decoder_fusion import GQA_DOMAIN, fuse_attention

    layers = fuse_attention(model, config)
    if not layers:
        return {}
    if not any(o.domain == GQA_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(GQA_DOMAIN, 1))
    return {"GroupQueryAttention": layers, "RotaryEmbedding": 2 * layers}


# the module that projects an MLP's activations back to the hidden size (BERT's layer.N.output.dense,
# Llama's mlp.down_proj, GPT-2's mlp.c_proj, OPT's fc2): its inputs have the widest range of the block
_FFN_DOWN = re.compile(r"(\.mlp\.down_proj|\.mlp\.c_proj|\.fc2|\.mlp\.dense_4h_to_h|(?<!attention)\.output\.dense)$")


def ffn_down_nodes(path: Path) -> list[str]:
    """Names of the MatMuls that are MLP down-projections, from the exporter's module-path metadata."""
    import onnx

    nodes = []
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type not in ("MatMul", "Gemm"):  # GPT-2's Conv1D exports as Gemm
            continue
        # the torch exporter records the module path of every node: ['', 'model', ..., 'model.x.output.dense', 'linear_5']
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
        try:
            modules = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        if any(isinstance(m, str) and _FFN_DOWN.search(m) for m in modules):
            nodes.append(node.name)
    return nodes


def quantize_int8(src: Path, dst: Path, *, external_data: bool = False, keep_fp32: list[str] | None = None) -> dict:
    """Dynamic int8 quantization of the weight matmuls (weights int8 per channel, activations at run time).

    Only MatMuls with a constant weight are quantized: the attention score/value matmuls keep fp32
    (quantizing them costs most of the accuracy for little speed).

    Args:
        keep_fp32: MatMul node names left in fp32 (see :func:`ffn_down_nodes`).

    Raises:
        ExportError: the quantizer failed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with silenced():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=external_data,
                             nodes_to_exclude=list(keep_fp32 or []), extra_options={"MatMulConstBOnly": True})
    except Exception as exc:
        raise ExportError(f"int8 quantization failed ({type(exc).__name__}: {exc})", path=src,
                          hint="export without --quantize") from exc
    return {"weights": "int8 per channel", "activations": "uint8 dynamic", "fp32_matmuls": len(keep_fp32 or [])}


def _accuracy_feeds(contract: IOContract, vocab: int, tokenizer) -> dict[str, torch.Tensor]:
    if tokenizer is None:
        return example_inputs(contract, vocab, batch=16, seq=24, left_pad=7, seed=3)
    if contract.task == CAUSAL_LM:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in contract.inputs:
        feeds["token_type_ids"] = batch.get("token_type_ids", torch.zeros_like(batch["input_ids"]))
    if contract.task == CAUSAL_LM:
        empty = torch.zeros(len(SENTENCES), contract.kv_heads, 0, contract.head_dim)
        feeds["position_ids"] = position_ids_for(feeds["attention_mask"], feeds["input_ids"].shape[1])
        feeds.update({name: empty for name in contract.past_names})
    return feeds


def int8_accuracy(run: Runner, wrapper: torch.nn.Module, contract: IOContract, vocab: int, tokenizer=None) -> dict:
    """How far the int8 model is from PyTorch fp32 (real sentences if there is a tokenizer).

    Returns:
        feature-extraction: ``cosine_mean`` / ``cosine_min`` of mean-pooled embeddings;
        classification: ``top1_agreement`` and ``cosine_mean`` of the logits; causal LMs:
        ``top1_agreement`` of the next-token prediction at every valid position.
    """
    feeds = _accuracy_feeds(contract, vocab, tokenizer)
    expected = call_wrapper(wrapper, contract, feeds)[0].numpy()
    actual = run({name: tensor.numpy() for name, tensor in feeds.items()})[0]
    mask = feeds["attention_mask"].numpy()
    result: dict = {"samples": int(mask.shape[0]), "inputs": "sentences" if tokenizer is not None else "random ids"}
    if contract.task == FEATURE_EXTRACTION:
        cos = (mean_pool(actual, mask) * mean_pool(expected, mask)).sum(-1)
        result.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
    elif contract.task == CAUSAL_LM:
        valid = mask.astype(bool)
        result.update(top1_agreement=float((actual.argmax(-1)[valid] == expected.argmax(-1)[valid]).mean()),
                      positions=int(valid.sum()))
    else:
        a, e = actual.astype(np.float64), expected.astype(np.float64)
        cos = (a * e).sum(-1) / np.clip(np.linalg.norm(a, axis=-1) * np.linalg.norm(e, axis=-1), 1e-12, None)
        result.update(top1_agreement=float((a.argmax(-1) == e.argmax(-1)).mean()), cosine_mean=float(cos.mean()))
    return result
