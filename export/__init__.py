"""rawformer.export: checkpoint loading (Hugging Face safetensors directories) and tokenizers.

    from rawformer.export import load_hf, load_tokenizer
    model = load_hf("path/to/checkpoint", dtype="float16")     # config.json + model.safetensors (or shards)
    tok = load_tokenizer("path/to/checkpoint")                 # tokenizer.json, needs the "hf" extra

(ONNX import and export come with a later issue.)
"""

from rawformer.export.hf import CheckpointError, load_hf, read_config
from rawformer.export.safetensors import SafetensorsError, SafetensorsFile, read_safetensors
from rawformer.export.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError",
    "SafetensorsError",
    "SafetensorsFile",
    "Tokenizer",
    "load_hf",
    "load_tokenizer",
    "read_config",
    "read_safetensors",
]
