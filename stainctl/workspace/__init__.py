"""The on-disk workspace: manifest, writer lock, layout and atomic outputs."""

from stainctl.workspace.atomic import atomic_bytes, atomic_path, atomic_png
from stainctl.workspace.lock import WriterLock
from stainctl.workspace.manifest import SCHEMA_VERSION, Manifest
from stainctl.workspace.records import (
    ArtifactRecord,
    GridRecord,
    RunRecord,
    SlideRecord,
    SlideSummary,
    StepRecord,
    TileCell,
    TileRecord,
)
from stainctl.workspace.workspace import EmbeddingFiles, Workspace

__all__ = ["SCHEMA_VERSION", "ArtifactRecord", "EmbeddingFiles", "GridRecord", "Manifest",
           "RunRecord", "SlideRecord", "SlideSummary", "StepRecord", "TileCell", "TileRecord",
           "Workspace", "WriterLock", "atomic_bytes", "atomic_path", "atomic_png"]
