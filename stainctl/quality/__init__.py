"""Tile informativeness metrics and their parallel runner."""
