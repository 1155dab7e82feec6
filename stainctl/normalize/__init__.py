"""Stain normalisation: bring H&E from another scanner or site to a reference's colours.

`sample.py` picks the tissue pixels of a reference (an image or a slide) and of a workspace slide;
`classical.py` fits Macenko or Reinhard (torchstain) once per slide and applies the fitted
parameters to every tile through one lookup table, so neighbouring tiles agree and glass stays
glass. The learned `stainfuser` method is an engine (`engines/stainfuser/`).
"""

METHODS = ("macenko", "reinhard", "stainfuser")
CLASSICAL = ("macenko", "reinhard")
