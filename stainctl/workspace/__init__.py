"""The on-disk workspace: manifest, writer lock, layout and atomic outputs."""

from stainctl.workspace.atomic import atomic_path
from stainctl.workspace.lock import WriterLock
from stainctl.workspace.manifest import SCHEMA_VERSION, Manifest
from stainctl.workspace.workspace import Workspace

__all__ = ["SCHEMA_VERSION", "Manifest", "Workspace", "WriterLock", "atomic_path"]
