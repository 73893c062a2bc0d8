"""Training methods, one file each: what differs from the plain loop (`train/recipe.py` says what a recipe is)."""
