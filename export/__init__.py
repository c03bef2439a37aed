"""reformer_rt.export: PyTorch Reformer -> ONNX (LSH attention as a plugin node or as portable standard ops).

``export_onnx`` is the entry point (``reformer-rt export`` on the command line); ``read_metadata`` reads what an
exported file records about its model and options, ``export_metadata`` also checks it. This package imports onnx; onnxruntime and
onnxruntime-extensions are needed for validation only.
"""

from .errors import ExportError, ValidationError
from .metadata import export_metadata, read_metadata
from .onnx_export import DEFAULT_OPSET, ExportReport, export_onnx, load_source

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportReport", "ValidationError", "export_metadata", "export_onnx",
           "load_source", "read_metadata"]
