"""rawformer.models: GPT-2, Llama, BERT and MLA models, one readable file each (the runtime issue)."""
