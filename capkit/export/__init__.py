"""Export a trained captioner for runtimes without PyTorch (``export_onnx``: ONNX graphs that the ``capkit_onnx``
runtime decodes with onnxruntime)."""
from capkit.export.onnx import ExportSummary, export_onnx

__all__ = ["ExportSummary", "export_onnx"]
