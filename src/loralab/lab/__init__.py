"""The lab: a procedural world of captioned shapes, its evaluator, the shipped tiny base model and the demo.

The base model's training script and packer are build tools outside the package: `tools/lab/`."""
