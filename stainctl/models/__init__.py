"""Model cards, weight resolution and the foundation-model encoders."""
