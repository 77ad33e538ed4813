"""GPU tests (`pytest -m gpu`): the hf engine and a LoRA fine-tune on a CUDA device; skipped without one."""
