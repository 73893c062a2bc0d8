"""The lab: a procedural world of captioned shapes, its evaluator, and the tiny base model's training script."""
