"""Making timm (and anything else that imports torchvision) importable on a CPU-only torch.

The only torchvision wheel for this torch is a CUDA build: its compiled `_C` library cannot load
against CPU torch, and then `import torchvision` fails ("operator torchvision::nms does not exist")
because it registers fake kernels for two operators that `_C` would have defined. Declaring those
two operator schemas first lets the pure-Python parts (transforms, model classes) import and work;
only the compiled ops stay unavailable, and stainctl does not use them (docs/NOTES.md). Where `_C`
loads (a CUDA machine) nothing is changed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from stainctl.errors import ModelError

_library: Any = None  # keeps the schema registrations alive


def prepare_torchvision() -> None:
    """Call before the first import of timm, torchvision, torchmetrics, peft or diffusers."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise ModelError("the encoders need torchvision (timm imports it); install it with "
                         "`pip install -c constraints.txt torchvision`")
    import torch

    for lib in sorted(Path(spec.origin).parent.glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))
            return
        except (OSError, RuntimeError):
            break
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library = library
