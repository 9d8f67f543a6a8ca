"""rawformer.export: ONNX import and export, safetensors / HF checkpoint loading (later issues)."""
