"""The names of the files in an exported directory, in one place: the exporter writes them, the
runtime, ``verify``, ``patch`` and ``serve`` read them. Standard library only, so the torch-free
runtime can import it.

    model.onnx (+ model.onnx.data)   the fp32 graph every export has
    model.int8.onnx / model.int4.onnx  a quantized copy, kept only when it earned its place
    model.fp16.onnx                   the graph in float16 (onnxruntime CUDA), kept likewise
    model.engine, timing.cache        the TensorRT engine (``--trt``) and its builder cache
    weights_map.json                  where each source weight lives in the graph (``patch`` reads it)
    adapter_inputs.json               the packed adapter input's layout (``--adapter-inputs``)
    report.json, report.md            the parity certificate and latency report
"""

from __future__ import annotations

MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = f"{MODEL_FILE}.data"  # external data, where the weights exceed protobuf's 2 GB
OPTIMIZED_FILE = "model.optimized.onnx"  # --optimize's output; renamed to model.onnx once measured
INT8_FILE = "model.int8.onnx"
INT4_FILE = "model.int4.onnx"
FP16_FILE = "model.fp16.onnx"
WEIGHT_ONLY_FILES = {"int4": INT4_FILE, "int8": INT8_FILE}  # a causal LM's weight-only quantization
# --quantize's values and the file each writes beside model.onnx (an encoder's int8 shares int8's name)
QUANTIZED_FILES = {"int8": INT8_FILE, "int4": INT4_FILE, "fp16": FP16_FILE}
ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
WEIGHTS_MAP_FILE = "weights_map.json"
LAYOUT_FILE = "adapter_inputs.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

# the files that compute: what the certificate's engine link hashes
ENGINE_FILES = (MODEL_FILE, MODEL_DATA_FILE, ENGINE_FILE)
# files that hold the base's weights in another form than model.onnx: a patched copy would be stale
STALE_FILES = (*(name for file in QUANTIZED_FILES.values() for name in (file, f"{file}.data")), ENGINE_FILE)
