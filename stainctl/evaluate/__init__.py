"""Evaluation of generated slides: image-quality and stain metrics, seams, QC report."""
