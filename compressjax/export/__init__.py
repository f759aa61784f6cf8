"""The compact, safe model file: pruning and quantization turned into bytes saved on disk.

``save`` writes one file (no pickle: a binary preamble with magic bytes, format version and SHA-256, a
JSON header describing the tree, then zstd-coded streams of packed integers, sparse positions and
values); ``load`` reads it back bit-exactly; ``size_report`` tells where the bytes go. See
:mod:`compressjax.export._container` for the byte layout, :mod:`compressjax.export._codec` for the array
encodings and :mod:`compressjax.export._structure` for the supported containers.
"""

from compressjax.export._api import LeafSize, SizeReport, load, save, size_report
from compressjax.export._container import FORMAT_VERSION, FormatError

__all__ = ["save", "load", "size_report", "SizeReport", "LeafSize", "FormatError", "FORMAT_VERSION"]
