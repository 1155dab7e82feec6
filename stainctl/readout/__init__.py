"""Slide-level IHC readouts and the files they are written to (CSV, GeoJSON, heat-map PNG)."""
