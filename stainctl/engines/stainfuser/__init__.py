"""The `stainfuser` engine: StainFuser's conditional diffusion stain normaliser (R-J96/stainFuser)."""
