"""Export: PyTorch -> ONNX (and TensorRT), with a parity certificate and a latency report.

    import hypermerge as hm
    result = hm.export_model("folded", "exported")          # hypermerge export folded --out exported
    report = hm.verify_export("exported")                   # hypermerge verify exported
    model = hm.OnnxModel.load("exported")                   # embed / classify / generate
"""

from hypermerge.export.api import ExportResult, Report, export_model, verify_export
from hypermerge.export.tasks import TASKS, IOContract, detect_task
from hypermerge.runtime.model import OnnxModel

__all__ = ["TASKS", "ExportResult", "IOContract", "OnnxModel", "Report", "detect_task", "export_model",
           "verify_export"]
