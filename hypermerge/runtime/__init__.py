"""The runtime: an exported directory loaded and run with numpy, onnxruntime and tokenizers only
(no torch, no transformers), as ``hm.OnnxModel`` and ``hypermerge serve`` use it.

    model = hm.OnnxModel.load("exported")
    model.embed(["a sentence"]); model.classify(["great film"]); model.generate(["Once upon"])

Modules: ``model`` (OnnxModel and the KV-cache decode loop), ``tokenizer`` (tokenizer.json without
transformers), ``contract`` (the graph's input/output names per task), ``ort`` (sessions and
providers), ``textstream`` (streaming detokenization), ``adapter_scales`` (per-call adapters of an
``--adapter-inputs`` export), ``weights_map`` (``weights_map.json`` as data). The exporter
(:mod:`hypermerge.export`) builds on these; nothing here imports it.
"""

from hypermerge.runtime.contract import (
           CAUSAL_LM,
           FEATURE_EXTRACTION,
           SEQUENCE_CLASSIFICATION,
           TASKS,
           IOContract,
)
from hypermerge.runtime.model import MODEL_FILE, OnnxModel, StreamStep
from hypermerge.runtime.tokenizer import TextTokenizer

__all__ = ["CAUSAL_LM", "FEATURE_EXTRACTION", "MODEL_FILE", "SEQUENCE_CLASSIFICATION", "TASKS", "IOContract",
           "OnnxModel", "StreamStep", "TextTokenizer"]
