"""Training: stage 1 (full fine-tune on Ray Train + DeepSpeed) and stage 2 (LoRA sweeps on Ray Tune)."""
