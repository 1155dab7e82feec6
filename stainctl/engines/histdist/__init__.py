"""HistDiST (arXiv 2505.06793): structure-preserving H&E -> IHC translation."""
