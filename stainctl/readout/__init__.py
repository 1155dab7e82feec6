"""Slide-level IHC readouts: DAB area, H-score, nuclei and their positivity (`stainctl readout`)."""
