"""Stitching translated tiles into pyramidal slides."""
