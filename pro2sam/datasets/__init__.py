"""WSOL data sets: one reader interface over CUB-200-2011, ILSVRC, wsolevaluation metadata and manifests.

Every reader returns a :class:`WSOLDataset`: class names in class-index order and one
:class:`Sample` per image, with the conventions of :mod:`pro2sam.datasets.common` (0-based labels,
boxes ``(x0, y0, x1, y1)`` in original image pixels, masks as PNG URIs). One module per layout:
:mod:`~pro2sam.datasets.cub`, :mod:`~pro2sam.datasets.ilsvrc`, :mod:`~pro2sam.datasets.wsol`
(``clovaai/wsolevaluation``'s metadata), :mod:`~pro2sam.datasets.manifest` and
:mod:`~pro2sam.datasets.coco` (COCO instances JSON);
:func:`open_dataset` picks one from a one-string spec.
"""

from .coco import read_coco
from .common import MANIFEST_COLUMNS, DatasetError, Sample, WSOLDataset, open_dataset
from .cub import read_cub
from .ilsvrc import read_ilsvrc
from .manifest import read_manifest
from .wsol import read_wsol_metadata

__all__ = [
    "DatasetError",
    "Sample",
    "WSOLDataset",
    "MANIFEST_COLUMNS",
    "read_cub",
    "read_ilsvrc",
    "read_wsol_metadata",
    "read_manifest",
    "read_coco",
    "open_dataset",
]
