"""stainctl: batch virtual IHC staining of H&E whole-slide images."""

__version__ = "0.1.0"
