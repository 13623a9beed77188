"""Data: decoding of medical image files, the BMAD layout, the demo dataset, anomaly synthesis."""

from adcore.data.decode import SUPPORTED_SUFFIXES, Frame, decode_image, decode_path
from adcore.data.errors import DatasetLayoutError, DecodeError

__all__ = ["SUPPORTED_SUFFIXES", "DatasetLayoutError", "DecodeError", "Frame", "decode_image", "decode_path"]
