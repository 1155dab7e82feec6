"""Whole-slide reading, tissue detection and the tile grid."""

from stainctl.slide.reader import Slide, open_slide

__all__ = ["Slide", "open_slide"]
