"""HistoStainAlign: H&E and IHC tile embeddings pulled together, an IHC pattern class per tile,
and its slide-level aggregation (`train-align`, `predict`)."""
