"""Caption images with a capkit model exported to ONNX, without PyTorch: onnxruntime, numpy and Pillow only.

    from capkit_onnx import OnnxCaptioner
    model = OnnxCaptioner.from_pretrained("exported/")   # written by `capkit export --format onnx`
    print(model.caption("photo.jpg").caption)
"""
from capkit_onnx.beam_search import Hypothesis, beam_search
from capkit_onnx.captioner import OnnxCaptioner, OnnxCaptionResult, OnnxModelError
from capkit_onnx.images import open_image, preprocess

__version__ = "0.3.0"

__all__ = ["Hypothesis", "OnnxCaptionResult", "OnnxCaptioner", "OnnxModelError", "beam_search", "open_image",
           "preprocess", "__version__"]
