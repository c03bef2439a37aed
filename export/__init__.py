"""reformer_rt.export: PyTorch Reformer -> ONNX (LSH attention as a plugin node or as portable standard ops).

``export_onnx`` is the entry point (``reformer-rt export`` on the command line); ``read_metadata`` reads what an
exported file records about its model and options, ``export_metadata`` also checks it, and ``export_info`` gives
the checked result as one typed ``ExportInfo``. ``export_onnx(..., quantize="int8")`` writes int8 weight products
with ONNX Runtime's quantization tools (``quantize.py``) and validates them by task metrics on text
(``quality.py``). This package imports onnx; onnxruntime and onnxruntime-extensions are needed for validation
and quantization only.
"""

from .errors import ExportError, ValidationError
from .metadata import ExportInfo, Quantization, export_info, export_metadata, read_metadata
from .onnx_export import DEFAULT_OPSET, ExportReport, export_onnx, load_source
from .quality import QualityCheck

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportInfo", "ExportReport", "QualityCheck", "Quantization",
           "ValidationError", "export_info", "export_metadata", "export_onnx", "load_source", "read_metadata"]
