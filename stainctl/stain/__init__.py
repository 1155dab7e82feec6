"""Colour deconvolution and tissue rules shared by training and evaluation (one definition each,
with a numpy and a differentiable torch form where both are needed)."""
