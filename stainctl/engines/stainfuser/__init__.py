"""The `stainfuser` engine: StainFuser's diffusion stain normaliser (R-J96/stainFuser)."""
