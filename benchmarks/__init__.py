"""Measurements of lora-lightning: the training-step benchmark, the step profile, multi-GPU runs and the QLoRA
demo. Importable from the repository root (``python -m benchmarks.benchmark``), never installed."""
