"""reformer_rt.export: PyTorch Reformer -> ONNX (LSH attention as a plugin node or as portable standard ops).

``export_onnx`` is the entry point (``reformer-rt export`` on the command line); ``read_metadata`` reads what an
exported file records about its model and options, ``export_metadata`` also checks it, and ``export_info`` gives
the checked result as one typed ``ExportInfo``. This package imports onnx; onnxruntime and onnxruntime-extensions
are needed for validation only.
"""

from .errors import ExportError, ValidationError
from .metadata import ExportInfo, export_info, export_metadata, read_metadata
from .onnx_export import DEFAULT_OPSET, ExportReport, export_onnx, load_source

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportInfo", "ExportReport", "ValidationError", "export_info",
           "export_metadata", "export_onnx", "load_source", "read_metadata"]
