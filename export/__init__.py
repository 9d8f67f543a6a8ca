"""rawformer.export: checkpoint loading (Hugging Face safetensors directories) and tokenizers.

    from rawformer.export import load_hf, load_tokenizer
    model = load_hf("path/to/checkpoint", dtype="float16")     # config.json + model.safetensors (or shards)
    tok = load_tokenizer("path/to/checkpoint")                 # tokenizer.json, needs the "hf" extra

    from rawformer.export import read_onnx, OnnxExecutor, export_onnx
    ex = OnnxExecutor(read_onnx("model.onnx"))                 # any supported graph, node by node
    export_onnx(model, "out.onnx")                             # native GPT-2 / Llama / BERT -> ONNX
(`rawformer.load("model.onnx")` maps recognised GPT-2 / Llama / BERT graphs onto the native models.)
"""

from rawformer.export.hf import CheckpointError, load_hf, read_config
from rawformer.export.onnx_executor import OnnxExecutor, UnsupportedOpsError
from rawformer.export.onnx_export import GraphBuilder, export_onnx
from rawformer.export.onnx_file import OnnxFileError, OnnxModel, read_onnx
from rawformer.export.onnx_import import NotRecognised, recognise
from rawformer.export.safetensors import SafetensorsError, SafetensorsFile, read_safetensors
from rawformer.export.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError",
    "GraphBuilder",
    "NotRecognised",
    "OnnxExecutor",
    "OnnxFileError",
    "OnnxModel",
    "UnsupportedOpsError",
    "export_onnx",
    "read_onnx",
    "recognise",
    "SafetensorsError",
    "SafetensorsFile",
    "ByteTokenizer",
    "Tokenizer",
    "load_hf",
    "load_tokenizer",
    "read_config",
    "read_safetensors",
]
