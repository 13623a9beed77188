"""Decode image bytes (PNG, JPEG, TIFF, DICOM, NIfTI) into float frames in [0, 1].

The format is chosen from the file's magic bytes first and its name second.
:func:`decode_image` is the file boundary: whatever a library raises while reading or
decoding (pydicom, nibabel, PIL, tifffile, numpy) leaves it as a :class:`DecodeError`
with a ``kind`` the scoring job can count by, never as another exception. A frame of a
multi-frame file that fails alone fails alone (see ``frame_errors``).
DICOM error reasons are this module's own text (fixed descriptions, attribute keywords,
transfer syntax names, exception class names): no library message, which may quote element
values, is kept. pydicom's own log records may quote element values: jobs drop those with
:func:`adcore.logs.quiet_third_party_loggers`.

Compressed DICOM is decoded by pydicom's pixel-data plugins: Pillow (JPEG baseline),
python-gdcm (JPEG lossless, JPEG extended, JPEG-LS, JPEG 2000), pylibjpeg with its
openjpeg (JPEG 2000, HTJ2K) and rle plugins, pyjpegls (JPEG-LS) and pydicom's own RLE and
deflate. ``tests/unit/data/test_real_corpus.py`` measures what decodes.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adcore.data.errors import DecodeError

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_GZIP_MAGIC = b"\x1f\x8b"
_DICOM_PREAMBLE = 128  # bytes before the "DICM" prefix (PS3.10 7.1)
_NIFTI1_HDR, _NIFTI2_HDR = 348, 540  # sizeof_hdr of NIfTI-1 / NIfTI-2
_CIFTI_INTENTS = (3000, 3100)  # NIfTI intent codes reserved for CIFTI-2
_NIFTI_PERCENTILES = (0.5, 99.5)  # per-volume intensity clip, robust to hot voxels
_MAX_REASON = 200  # characters of a library message kept in a reason
_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"  # JPEG Extended (Process 2 and 4): 8- or 12-bit
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000, all frames together
# Frames per file: a CT series is a few hundred to a few thousand slices; every frame becomes a
# prepared network input whatever its own size (a 1x1 frame too), so frames need their own bound.
DEFAULT_MAX_FRAMES = 4096
_FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "dicom": "DICOM", "dicom_raw": "DICOM", "nifti": "NIfTI"}


@dataclass
class Frame:
    """One 2D image decoded from a file.

    Attributes:
        pixels: float32 in [0, 1], HxW grayscale or HxWx3 RGB.
        index: Frame or slice index within the file (0 for a 2D image).
        modality: DICOM Modality (e.g. "CT", "MR"), "" for a DICOM file without one, None for other formats.
        study_uid: Raw DICOM StudyInstanceUID. Kept in memory only so the scoring job
            can hash it; it must never be written out or logged as is.
        error: Set when this frame alone could not be decoded (the file's other frames
            could); ``pixels`` is then an empty ``0x0`` array. Only returned by
            :func:`decode_image` with ``frame_errors=True``.
    """

    pixels: np.ndarray
    index: int = 0
    modality: str | None = None
    study_uid: str | None = None
    error: DecodeError | None = None

    def __repr__(self) -> str:  # keeps the raw UID out of logs and tracebacks
        err = f", error={self.error.kind!r}" if self.error is not None else ""
        return (
            f"Frame(shape={tuple(self.pixels.shape)}, index={self.index}, "
            f"modality={self.modality!r}, study_uid={'<set>' if self.study_uid else None}{err})"
        )


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def decode_path(
    path, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_frames: int = DEFAULT_MAX_FRAMES, frame_errors: bool = False
) -> list[Frame]:
    """Reads a local file and decodes it (see :func:`decode_image`)."""
    path = Path(path)
    return decode_image(
        path.read_bytes(), str(path), max_pixels=max_pixels, max_frames=max_frames, frame_errors=frame_errors
    )


def decode_image(
    data: bytes,
    name: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    frame_errors: bool = False,
) -> list[Frame]:
    """Decodes one file's bytes into frames.

    This is the file boundary: any exception raised while reading or decoding becomes a
    :class:`DecodeError`; nothing else leaves it (except ``BaseException``s such as
    ``KeyboardInterrupt``).

    Args:
        data: The whole file.
        name: Its name, path or URI; used for the extension fallback and in errors.
        max_pixels: Refuse files whose header announces more pixels (all frames) than this,
            before any pixel is decoded.
        max_frames: Refuse files whose header announces more frames (DICOM NumberOfFrames,
            TIFF pages, NIfTI slices times volumes) than this, before any pixel is decoded.
        frame_errors: When some frames of a multi-frame file fail and others decode, also
            return the failed ones, as Frames whose ``error`` is set (and ``pixels`` empty).
            When False (the default) such frames are left out. A file none of whose frames
            decode always raises.

    Returns:
        One Frame per image, frame or slice, in file order.

    Raises:
        DecodeError: kind "empty", "truncated", "unsupported", "corrupt", "too_large",
            "too_many_frames" or "invalid_header".
    """
    if not data:
        raise DecodeError(name, "empty", "zero bytes")
    fmt = None
    try:
        fmt = _sniff(data, name)
        if fmt in ("png", "jpeg"):
            frames = _decode_pil(data, name, fmt, max_pixels)
        elif fmt == "tiff":
            frames = _decode_tiff(data, name, max_pixels, max_frames)
        elif fmt in ("dicom", "dicom_raw"):
            frames = _decode_dicom(data, name, max_pixels, max_frames, force=fmt == "dicom_raw")
        elif fmt == "nifti":
            frames = _decode_nifti(data, name, max_pixels, max_frames)
        elif fmt is not None and fmt.startswith("misnamed:"):
            raise DecodeError(name, "corrupt", f"content does not start with a {fmt.split(':')[1]} signature")
        else:
            raise DecodeError(name, "unsupported", f"unknown format (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        for f in frames:
            if f.error is None:
                _check_frame_shape(name, fmt, f.pixels.shape)
                f.pixels = np.ascontiguousarray(np.clip(np.nan_to_num(f.pixels), 0.0, 1.0), dtype=np.float32)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError(name, "too_large", "ran out of memory while decoding") from None
    except Exception as e:  # the file boundary: a bad file is an error row, never a failed task
        # Only the class name: a library message may quote the file's content.
        what = _FORMAT_NAMES.get(fmt or "", "file")
        raise DecodeError(name, "corrupt", f"{what} decoder failed ({type(e).__name__})") from None
    if not frame_errors:
        frames = [f for f in frames if f.error is None]
    return frames


def _check_frame_shape(name: str, fmt: str | None, shape: tuple[int, ...]) -> None:
    """A decoded frame is H x W or H x W x 3 with H, W > 0; a damaged header can make a library return other shapes."""
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3)) or min(shape[:2], default=0) <= 0:
        what = _FORMAT_NAMES.get(fmt or "", "file")
        raise DecodeError(name, "corrupt", f"{what} decoded to frames of shape {shape}, not H x W (x 3)")


def _sniff(data: bytes, name: str) -> str | None:
    lower = name.lower().split("?")[0]
    if data[_DICOM_PREAMBLE : _DICOM_PREAMBLE + 4] == b"DICM":  # first: preambles may look like TIFF
        return "dicom"
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data[:4] in _TIFF_MAGICS:
        return "tiff"
    if data.startswith(_GZIP_MAGIC) or data[344:348] in (b"n+1\x00", b"ni1\x00") or data[4:7] == b"n+2":
        return "nifti"
    if lower.endswith((".nii", ".nii.gz")):
        return "nifti"
    if lower.endswith((".dcm", ".dicom")):
        return "dicom_raw"  # DICOM without the 128-byte preamble: parse with force
    for suffixes, fmt in (((".png",), "PNG"), ((".jpg", ".jpeg"), "JPEG"), ((".tif", ".tiff"), "TIFF")):
        if lower.endswith(suffixes):
            return f"misnamed:{fmt}"
    return None


# ----------------------------------------------------------------------------- PIL
def _decode_pil(data: bytes, name: str, fmt: str, max_pixels: int) -> list[Frame]:
    from PIL import Image, UnidentifiedImageError

    with _quiet():
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise DecodeError(name, "too_large", "header announces more pixels than PIL allows") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            kind = "truncated" if _lacks_end_marker(data, fmt) else "corrupt"
            raise DecodeError(name, kind, f"cannot read {fmt.upper()} header ({_short(e)})") from None
        w, h = im.size
        if w * h > max_pixels:
            raise DecodeError(name, "too_large", f"{w}x{h} pixels exceeds max_pixels={max_pixels}")
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            truncated = _lacks_end_marker(data, fmt) or "truncat" in str(e).lower()
            raise DecodeError(name, "truncated" if truncated else "corrupt", _short(e)) from None
    return [Frame(_pil_to_float(im), 0)]


def _lacks_end_marker(data: bytes, fmt: str) -> bool:
    if fmt == "png":
        return b"IEND" not in data[-16:]
    if fmt == "jpeg":
        return data.rstrip(b"\x00")[-2:] != b"\xff\xd9"
    return False


def _pil_to_float(im) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32) / 65535.0
    if mode == "I":  # 32-bit int container; older Pillow stores 16-bit PNGs here
        return np.asarray(im).astype(np.float32) / 65535.0
    if mode == "F":
        return _minmax(np.asarray(im, dtype=np.float32))
    if mode in ("L", "LA"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- TIFF
def _decode_tiff(data: bytes, name: str, max_pixels: int, max_frames: int) -> list[Frame]:
    import tifffile

    with _quiet():
        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                shape, axes = tuple(series.shape), series.axes
                # Samples last (contiguous) or just before the image axes (planar configuration 2).
                s_axis = axes.rfind("S")
                color = s_axis in (len(axes) - 1, len(axes) - 3) and shape[s_axis] in (3, 4)
                n_pix = int(np.prod(shape)) // (shape[s_axis] if color else 1)
                _check_frames(name, int(np.prod(shape[: -3 if color else -2])), max_frames)
                if n_pix > max_pixels:
                    raise DecodeError(
                        name, "too_large", f"{n_pix} pixels ({axes}={shape}) exceeds max_pixels={max_pixels}"
                    )
                errors: dict[int, DecodeError] = {}
                try:
                    arr = series.asarray()
                except Exception as e:
                    pages = list(series.pages)
                    if len(pages) <= 1:
                        raise
                    arr, errors = _tiff_pages(pages, name)  # one bad page fails that page only
                    if arr is None:
                        raise _tiff_error(name, e) from None
        except DecodeError:
            raise
        except Exception as e:  # tifffile raises many types for damaged files
            raise _tiff_error(name, e) from None
    if color:
        if s_axis == len(axes) - 3:  # planar RGB: samples to the last axis
            arr = np.moveaxis(arr, -3, -1)
        arr = arr[..., :3]
        stack = arr.reshape((-1,) + arr.shape[-3:])
    else:
        stack = arr.reshape((-1,) + arr.shape[-2:])
    scaled = _scale_by_dtype(stack)
    if not errors:
        return [Frame(scaled[i], i) for i in range(scaled.shape[0])]
    frames, k = [], 0
    for i in range(len(errors) + scaled.shape[0]):
        if i in errors:
            frames.append(Frame(np.zeros((0, 0), np.float32), i, error=errors[i]))
        else:
            frames.append(Frame(scaled[k], i))
            k += 1
    return frames


def _tiff_error(name: str, e: BaseException) -> DecodeError:
    kind = "truncated" if isinstance(e, (EOFError, struct.error)) or "truncat" in str(e).lower() else "corrupt"
    return DecodeError(name, kind, f"TIFF read failed ({_short(e)})")


def _tiff_pages(pages, name: str):
    """Reads a multi-page series page by page: ([P_ok, ...] or None, {page index: error})."""
    good, errors = [], {}
    for i, page in enumerate(pages):
        try:
            if page is None:
                raise EOFError("page missing")
            good.append(page.asarray())
        except Exception as e:
            err = _tiff_error(name, e)
            errors[i] = DecodeError(name, err.kind, f"page {i}: {err.reason}")
    if not good or len({a.shape for a in good}) > 1:
        return None, errors
    return np.stack(good), errors


def _scale_by_dtype(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    return _minmax(a.astype(np.float32))


def _minmax(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float32))
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _check_frames(name: str, n_frames: int, max_frames: int) -> None:
    """Refuses a file whose header announces more frames than ``max_frames`` (nothing decoded yet)."""
    if n_frames > max_frames:
        raise DecodeError(name, "too_many_frames", f"{n_frames} frames exceeds max_frames={max_frames}")


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:_MAX_REASON]}"


# ----------------------------------------------------------------------------- DICOM
def _decode_dicom(data: bytes, name: str, max_pixels: int, max_frames: int, force: bool) -> list[Frame]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    _silence_gdcm()  # before pydicom's GDCM plugin first runs
    with _quiet():
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
        except InvalidDicomError:
            raise DecodeError(name, "corrupt", "not a DICOM file") from None
        except (EOFError, struct.error) as e:
            # The library message is not kept: it may quote element bytes.
            raise DecodeError(name, "truncated", f"DICOM header ends early ({type(e).__name__})") from None
        except Exception as e:
            raise DecodeError(name, "corrupt", f"cannot parse DICOM ({type(e).__name__})") from None
        if len(ds) == 0:
            raise DecodeError(name, "corrupt", "no DICOM data elements could be parsed")
        rows, cols = _int_attr(ds, "Rows", name), _int_attr(ds, "Columns", name)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            if (rows and cols) or _is_image_sop(ds):  # an image object without pixels: cut short
                raise DecodeError(name, "truncated", "image object but pixel data missing")
            raise DecodeError(name, "unsupported", "DICOM object has no pixel data")
        n_frames = _int_attr(ds, "NumberOfFrames", name, default=1) or 1
        if rows <= 0 or cols <= 0:
            raise DecodeError(name, "corrupt", "DICOM Rows/Columns missing or zero")
        if n_frames < 0:
            raise DecodeError(name, "invalid_header", "NumberOfFrames is negative")
        _check_frames(name, n_frames, max_frames)
        if rows * cols * n_frames > max_pixels:
            raise DecodeError(
                name, "too_large", f"{n_frames} frame(s) of {rows}x{cols} exceeds max_pixels={max_pixels}"
            )
        for kw in ("SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation"):
            _int_attr(ds, kw, name)  # fail early and by name on a malformed pixel description
        try:
            ts = _transfer_syntax(ds)
            ts_name = ts.name if ts.is_transfer_syntax else "a private transfer syntax"
        except Exception as e:
            raise DecodeError(name, "invalid_header", f"unusable TransferSyntaxUID ({type(e).__name__})") from None
        errors: dict[int, DecodeError] = {}
        try:
            # Frames beyond NumberOfFrames are not decoded: the header's count is what the bounds checked.
            ds.pixel_array_options(allow_excess_frames=False)
            arr = ds.pixel_array
            stack = arr[None] if n_frames == 1 else arr  # [F, R, C(, 3)]
        except Exception as e:
            whole = _pixel_error(name, e, ts_name)
            if ts == _JPEG_EXTENDED and whole.kind in ("unsupported", "corrupt"):
                # pydicom's permissively licensed plugins decline 12-bit JPEG Extended; GDCM's own reader decodes it.
                stack = _gdcm_stack(data, n_frames, rows, cols)
                if stack is None:
                    raise whole from None
            # Otherwise frame by frame, so that one bad frame fails that frame only: encapsulated
            # frames decode one by one; native data only when its buffer is short (the frames it
            # holds whole are then still good).
            elif whole.kind == "unsupported" or n_frames <= 1 or not (ts.is_encapsulated or whole.kind == "truncated"):
                raise whole from None
            else:
                stack, errors = _decode_frames(ds, name, n_frames, ts_name)
                if stack is None:
                    raise whole from None
        try:
            stack = _dicom_to_float(stack, ds)
        except Exception as e:
            # Keyword-level detail only: the values themselves never enter the reason.
            raise DecodeError(
                name, "invalid_header", f"modality LUT / VOI attributes unusable ({type(e).__name__})"
            ) from None
        # inside _quiet(): a malformed value warns with the value; "" when absent (None means "not DICOM")
        modality = _text_attr(ds, "Modality") or ""
        study_uid = _text_attr(ds, "StudyInstanceUID")
    frames, k = [], 0
    for i in range(n_frames if errors else stack.shape[0]):
        if i in errors:
            frames.append(Frame(np.zeros((0, 0), np.float32), i, modality, study_uid, error=errors[i]))
        else:
            frames.append(Frame(stack[k], i, modality, study_uid))
            k += 1
    return frames


def _int_attr(ds, keyword: str, name: str, default: int = 0) -> int:
    """An integer attribute (US/IS) of `ds`; a malformed value is an ``invalid_header`` error."""
    try:
        value = ds.get(keyword, default)
        if value is None or value == "":
            return default
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return int(value)
    except Exception as e:
        raise DecodeError(name, "invalid_header", f"{keyword} is not a valid number ({type(e).__name__})") from None


def _text_attr(ds, keyword: str) -> str | None:
    """A text attribute of `ds`, or None when absent or unreadable (it is metadata, not pixels)."""
    try:
        return str(ds.get(keyword, "") or "") or None
    except Exception:
        return None


def _no_plugin(e: Exception) -> bool:
    """pydicom has no decoder for the syntax, or none of its plugins is installed."""
    return isinstance(e, NotImplementedError) or (isinstance(e, RuntimeError) and "missing dependencies" in str(e))


def _pixel_error(name: str, e: Exception, ts_name: str) -> DecodeError:
    """A pixel decoding failure as a DecodeError; the library message is read, never kept."""
    if isinstance(e, MemoryError):
        return DecodeError(name, "too_large", f"ran out of memory decoding {ts_name} pixel data")
    msg = str(e).lower()
    if "less than expected" in msg or "truncat" in msg or isinstance(e, EOFError):
        return DecodeError(name, "truncated", f"pixel data shorter than the header announces ({ts_name})")
    if _no_plugin(e):
        return DecodeError(name, "unsupported", f"{ts_name}: no installed pixel-data plugin decodes it")
    if isinstance(e, RuntimeError) and "raised by all available plugins" in msg:
        plugin_lines = [ln for ln in msg.splitlines()[1:] if ln.strip()]
        if plugin_lines and all("does not support" in ln or "not supported" in ln for ln in plugin_lines):
            return DecodeError(name, "unsupported", f"{ts_name}: the installed plugins do not support this variant")
        return DecodeError(name, "corrupt", f"{ts_name} pixel data: every installed plugin failed to decode it")
    return DecodeError(name, "corrupt", f"{ts_name} pixel data failed to decode ({type(e).__name__})")


def _gdcm_stack(data: bytes, n_frames: int, rows: int, cols: int) -> np.ndarray | None:
    """Stored values [F, R, C] of a monochrome file read by GDCM's own reader; None when it cannot.

    pydicom's GDCM plugin declines 12-bit JPEG Extended; GDCM's ImageReader decodes it (checked
    against pydicom's reference values for ``JPGExtended.dcm``). The only other 12-bit decoder
    pydicom knows, pylibjpeg-libjpeg, is GPL-3.
    """
    try:
        import gdcm
    except ImportError:
        return None
    dtypes = {
        gdcm.PixelFormat.UINT8: np.uint8,
        gdcm.PixelFormat.INT8: np.int8,
        gdcm.PixelFormat.UINT12: np.uint16,
        gdcm.PixelFormat.INT12: np.int16,
        gdcm.PixelFormat.UINT16: np.uint16,
        gdcm.PixelFormat.INT16: np.int16,
    }
    try:
        with tempfile.NamedTemporaryFile(suffix=".dcm") as tmp:  # GDCM's Python reader takes a file name
            tmp.write(data)
            tmp.flush()
            reader = gdcm.ImageReader()
            reader.SetFileName(tmp.name)
            if not reader.Read():
                return None
            img = reader.GetImage()
            pf = img.GetPixelFormat()
            dtype = dtypes.get(pf.GetScalarType())
            if dtype is None or pf.GetSamplesPerPixel() != 1:
                return None
            buf = img.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM returns char* as str
        arr = np.frombuffer(buf, dtype=dtype)
        if arr.size != n_frames * rows * cols:
            return None
        return arr.reshape(n_frames, rows, cols)
    except Exception:
        return None


@functools.cache
def _silence_gdcm() -> None:
    """GDCM's trace messages go straight to stderr and may quote element values: turn them off."""
    try:
        import gdcm
    except ImportError:
        return
    gdcm.Trace.DebugOff()
    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()


def _decode_frames(ds, name: str, n_frames: int, ts_name: str):
    """Decodes frame by frame after the whole-file decode failed: ([F_ok, R, C(, 3)] or None, {index: error})."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import as_pixel_options

    ts = ds.file_meta.TransferSyntaxUID
    decoder = get_decoder(ts)
    opts = as_pixel_options(ds)
    # Native data whose buffer is short: check each frame's bytes instead of the whole buffer's.
    validate = ts.is_encapsulated
    good, errors = [], {}
    for i in range(n_frames):
        try:
            good.append(decoder.as_array(ds, index=i, validate=validate, **opts)[0])
        except Exception as e:
            if validate:
                err = _pixel_error(name, e, ts_name)
                errors[i] = DecodeError(name, err.kind, f"frame {i}: {err.reason}")
            else:  # native data: only a frame whose bytes are missing fails
                errors[i] = DecodeError(name, "truncated", f"frame {i}: pixel data ends before this frame does")
    if not good:
        return None, errors
    return np.stack(good), errors


def _is_image_sop(ds) -> bool:
    from pydicom.uid import UID

    sop = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    return sop is not None and "Image Storage" in UID(str(sop)).name


def _transfer_syntax(ds):
    """The dataset's transfer syntax; filled in from the parsed encoding when meta is missing."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta.TransferSyntaxUID = ts
    return UID(ts)


def _dicom_to_float(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values [F, R, C(, 3)] -> [0, 1]: modality LUT, then VOI (LUT or window), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _scale_by_dtype(apply_color_lut(arr, ds))
    if samples > 1:  # pydicom returns YBR data converted to RGB
        bits = int(ds.get("BitsStored", 8) or 8)
        return arr[..., :3].astype(np.float32) / float(2**bits - 1)
    values = apply_modality_lut(arr, ds)  # stored values -> HU / physical units, first
    if "VOILUTSequence" in ds:
        out = _minmax(apply_voi_lut(values, ds, index=0, prefer_lut=True))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        out = _window(values, ds)
    else:
        out = _minmax(values)
    if photometric == "MONOCHROME1":  # 0 means white: invert so bright is high everywhere
        out = 1.0 - out
    return out.astype(np.float32)


def _window(values: np.ndarray, ds) -> np.ndarray:
    """VOI windowing (PS3.3 C.11.2.1.2) mapped straight to [0, 1]: min-max to the window."""
    c = ds["WindowCenter"].value
    w = ds["WindowWidth"].value
    c = float(c[0] if ds["WindowCenter"].VM > 1 else c)
    w = float(w[0] if ds["WindowWidth"].VM > 1 else w)
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    x = values.astype(np.float32)
    if w <= 0 or (func == "LINEAR" and w < 1):
        return _minmax(x)  # invalid window: fall back to the data range
    if func == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if func == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0) if w > 1 else (x > c).astype(np.float32)


# ----------------------------------------------------------------------------- NIfTI
def _decode_nifti(data: bytes, name: str, max_pixels: int, max_frames: int) -> list[Frame]:
    import nibabel as nib

    gz = data.startswith(_GZIP_MAGIC)
    try:
        head = gzip.GzipFile(fileobj=io.BytesIO(data)).read(_NIFTI2_HDR) if gz else data[:_NIFTI2_HDR]
    except (OSError, EOFError) as e:
        raise DecodeError(name, "truncated" if isinstance(e, EOFError) else "corrupt", _short(e)) from None
    if len(head) < 4:
        raise DecodeError(name, "truncated", "shorter than a NIfTI header")
    sizeof_hdr = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]}
    if _NIFTI1_HDR in sizeof_hdr:
        cls, hdr_len = nib.Nifti1Image, _NIFTI1_HDR
    elif _NIFTI2_HDR in sizeof_hdr:
        cls, hdr_len = nib.Nifti2Image, _NIFTI2_HDR
    else:
        kind = "unsupported" if gz else "corrupt"
        raise DecodeError(name, kind, "not a NIfTI-1/NIfTI-2 file")
    if len(head) < hdr_len:
        raise DecodeError(name, "truncated", "NIfTI header ends early")
    try:
        header = cls.header_class.from_fileobj(io.BytesIO(head[:hdr_len]))
        shape = tuple(int(s) for s in header.get_data_shape())
        magic = bytes(header["magic"]).rstrip(b"\x00")
        intent = int(header["intent_code"])
        expected = int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
    except Exception as e:
        raise DecodeError(name, "corrupt", f"bad NIfTI header ({_short(e)})") from None
    if _CIFTI_INTENTS[0] <= intent < _CIFTI_INTENTS[1]:
        raise DecodeError(name, "unsupported", "CIFTI-2 file (a matrix over brain ordinates, not an image)")
    if magic in (b"ni1", b"ni2"):
        raise DecodeError(name, "unsupported", "NIfTI .hdr/.img pair; only single-file .nii is supported")
    n_vox = int(np.prod(shape)) if shape else 0
    _check_frames(name, int(np.prod(shape[2:])), max_frames)  # slices times volumes (see _nifti_frames)
    if n_vox > max_pixels:
        raise DecodeError(name, "too_large", f"volume {shape} exceeds max_pixels={max_pixels}")
    if n_vox == 0:
        raise DecodeError(name, "corrupt", f"NIfTI volume has no voxels (shape {shape})")
    try:  # bounded read: never inflate more than the header announces
        full = gzip.GzipFile(fileobj=io.BytesIO(data)).read(expected) if gz else data
    except EOFError:
        raise DecodeError(name, "truncated", "gzip stream ends early") from None
    except OSError as e:
        raise DecodeError(name, "corrupt", _short(e)) from None
    if len(full) < expected:
        raise DecodeError(name, "truncated", f"{len(full)} bytes, header needs {expected}")
    with _quiet():
        try:
            img = cls.from_bytes(full)
            try:
                img = nib.as_closest_canonical(img)  # RAS+: last spatial axis is inferior->superior
            except Exception:
                pass  # degenerate affine: keep the stored orientation
            vol = np.asarray(img.get_fdata(dtype=np.float32))
        except Exception as e:
            raise DecodeError(name, "corrupt", f"NIfTI data unreadable ({_short(e)})") from None
    return _nifti_frames(vol)


def _nifti_frames(vol: np.ndarray) -> list[Frame]:
    if vol.ndim == 2:
        vol = vol[:, :, None]
    vol = vol.reshape(vol.shape[:3] + (-1,))  # [X, Y, Z, T], extra dims folded into T
    n_z = vol.shape[2]
    frames = []
    for t in range(vol.shape[3]):
        v = np.nan_to_num(vol[..., t])
        lo, hi = np.percentile(v, _NIFTI_PERCENTILES)
        v = np.clip((v - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(v)
        for z in range(n_z):
            # rot90: rows run anterior->posterior, columns patient left->right (neurological view)
            frames.append(Frame(np.rot90(v[:, :, z]).astype(np.float32), t * n_z + z))
    return frames
