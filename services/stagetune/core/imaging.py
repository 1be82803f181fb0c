"""Image reading shared by ingest (headers only) and the VAE stage (pixels).

Both stages must agree on an image's size *after* EXIF rotation, otherwise the crop box ingest computed
would be applied to a rotated picture. Every failure becomes an `InputError` naming the file and the
reason, so ingest can list it in the report and the VAE stage can say which file broke.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps, UnidentifiedImageError

from stagetune.core.errors import InputError

if TYPE_CHECKING:  # torch is heavy: imported only when pixels are prepared
    import torch

#: EXIF orientations that swap width and height (90° / 270° rotations, with or without mirroring).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


#: Leading bytes → Pillow format, so `Image.open` tries one plugin instead of probing every registered one
#: (4× faster header reads once all plugins are loaded). Anything else is probed as before.
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"WEBP", 8, "WEBP"),
    (b"GIF8", 0, "GIF"),
)


def _format_hint(data: bytes) -> list[str] | None:
    for magic, offset, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return [name]
    return None


def _source_name(source: Path | str | bytes, name: str | None) -> str:
    if name:
        return name
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


def _open(source: Path | str | bytes, name: str) -> Image.Image:
    """Open lazily, turning Pillow's many exception types and the decompression-bomb check into one error."""
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise InputError(f"{name}: empty file (0 bytes)", field=name)
            handle: Any = io.BytesIO(source)
            hint = _format_hint(bytes(source[:16]))
        else:
            path = Path(source)
            if path.stat().st_size == 0:
                raise InputError(f"{name}: empty file (0 bytes)", field=name)
            handle, hint = path, None
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both the same.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if hint is not None:
                try:
                    return Image.open(handle, formats=hint)
                except UnidentifiedImageError:
                    handle.seek(0)  # the magic lied (or the header is broken): probe every format, as before
            return Image.open(handle)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"{name}: image too large (decompression-bomb limit Image.MAX_IMAGE_PIXELS="
            f"{Image.MAX_IMAGE_PIXELS}): {exc}",
            field=name,
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image or unsupported format", field=name) from None
    except FileNotFoundError:
        raise InputError(f"{name}: file not found", field=name) from None
    except PermissionError:
        raise InputError(f"{name}: unreadable (permission denied)", field=name) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{name}: cannot read image header: {exc}", field=name) from None


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block must not make a good image unusable
        return 1


def read_image_size(source: Path | str | bytes, *, name: str | None = None) -> tuple[int, int]:
    """(W, H) as the picture is displayed (after EXIF rotation), from the header only, pixels untouched.

    Ingest buckets thousands of images this way; decoding them would cost minutes.
    """
    label = _source_name(source, name)
    image = _open(source, label)
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InputError(f"{label}: invalid image dimensions {width}x{height}", field=label)
        if _orientation(image) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
    return int(width), int(height)


def check_complete(data: bytes, *, name: str) -> None:
    """Detect truncated JPEG/PNG files from their bytes without decoding pixels.

    Ingest already reads every file to hash it; a missing end marker is the usual sign of an interrupted
    download, and catching it here puts the file in the report instead of crashing the VAE stage later.
    """
    if data[:3] == b"\xff\xd8\xff":
        # Fast path: the end-of-image marker sits in the last bytes of a whole file (0xFF 0xD9 cannot occur
        # inside entropy-coded data, where 0xFF is always stuffed). Else search properly (trailing junk).
        if b"\xff\xd9" in data[-4096:] and len(data) > 4096:
            return
        last_scan = data.rfind(b"\xff\xda")
        if last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0:
            raise InputError(f"{name}: truncated JPEG (no end-of-image marker)", field=name)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in data[-64:]:
            raise InputError(f"{name}: truncated PNG (no IEND chunk)", field=name)


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a viewer would show it.

    Transparent pixels are composited on white (not black: SimpleTuner's `convert("RGB")` drops alpha,
    which turns transparent backgrounds into whatever colour the hidden pixels had). 16-bit and 32-bit
    greyscale are scaled to 8 bits rather than clipped, which would make most of the picture white.
    """
    import numpy as np

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image, dtype=np.float64)
        # "I" comes from 16-bit PNG/TIFF greyscale in practice: its range is 0..65535.
        scaled = np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        factor = 255.0 if peak <= 1.0 else 1.0
        scaled = np.clip(np.round(array * factor), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, HSV …
    except (ValueError, OSError) as exc:
        raise InputError(f"{name}: cannot convert image mode {mode} to RGB: {exc}", field=name) from None


#: A downscale first shrinks by whole factors (JPEG: in the DCT while decoding; other formats: Pillow's
#: `reduce`) down to no less than this many times the size asked for, then resamples with LANCZOS. At 3×
#: the result is 38–55 dB PSNR from a full-size decode + one LANCZOS resize on photographs, and 2–8×
#: faster for 1024–1536 px JPEGs bound for 64–256 px (benchmarks/bench_pixels.py).
REDUCING_GAP = 3.0
#: Names how pixels are made from a row's geometry; part of every pixel key, so a change to decoding or
#: resampling can never be served latents cached by the old way.
PIXEL_PIPELINE = "draft-reduce3-lanczos"


def _decode(image: Image.Image, label: str, at_least: tuple[int, int] | None) -> Image.Image:
    """Decode, rotate per EXIF and convert to RGB; `at_least` (displayed W, H) lets a JPEG decode smaller."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if at_least is not None and image.format == "JPEG":
                width, height = at_least
                if _orientation(image) in _SWAPPING_ORIENTATIONS:
                    width, height = height, width
                image.draft("RGB", (int(width * REDUCING_GAP), int(height * REDUCING_GAP)))
            image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image, label)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{label}: image too large (decompression-bomb limit): {exc}", field=label) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            raise InputError(f"{label}: truncated image ({reason})", field=label) from None
        raise InputError(f"{label}: cannot decode image: {reason}", field=label) from None


def load_image_rgb(source: Path | str | bytes, *, name: str | None = None) -> Image.Image:
    """Decode fully, rotate per EXIF and convert to RGB; any failure is an `InputError` for this file."""
    label = _source_name(source, name)
    return _decode(_open(source, label), label, None)


def load_sample_pixels(source: Path | str | bytes, sample: Any, *, name: str | None = None) -> torch.Tensor:
    """A manifest row's training pixels straight from its file: `prepare_pixels(load_image_rgb(…))`, faster.

    The header is checked against the row's `original_size` before decoding, so a JPEG can then be decoded
    at the smallest DCT scale that still leaves `REDUCING_GAP` × the first resize's size.
    """
    label = _source_name(source, name or _field(sample, "path"))
    image = _open(source, label)
    original = _size(_field(sample, "original_size"))
    with image:
        width, height = image.size
        if _orientation(image) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        if original is not None and (width, height) != original:
            raise _changed(label, (width, height), original)
        first = _size(_field(sample, "downsample_size")) or _size(_field(sample, "intermediary_size"))
        return _apply_geometry(_decode(image, label, first), sample, label)


def _field(sample: Any, key: str) -> Any:
    if isinstance(sample, Mapping):
        return sample.get(key)
    return getattr(sample, key, None)


def _size(value: Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    return int(value[0]), int(value[1])


def _changed(name: str, size: tuple[int, int], original: tuple[int, int]) -> InputError:
    return InputError(
        f"{name}: image is {size[0]}x{size[1]} but the manifest says {original[0]}x{original[1]} "
        f"(file changed since ingest?)",
        field=name,
    )


def prepare_pixels(image: Image.Image, sample: Any) -> torch.Tensor:
    """Apply a manifest row's geometry to a full-size image and return a [3, H, W] float tensor in [-1, 1]."""
    name = str(_field(sample, "path") or _field(sample, "sample_id") or "<image>")
    original = _size(_field(sample, "original_size"))
    if original is not None and tuple(image.size) != original:
        raise _changed(name, tuple(image.size), original)
    return _apply_geometry(image, sample, name)


def _apply_geometry(image: Image.Image, sample: Any, name: str) -> torch.Tensor:
    """Order as SimpleTuner's TrainingSample: optional downsample, LANCZOS resize to the intermediary size,
    crop box, then exactly the target size (a no-op unless the box was clipped at an edge). The row
    carries every number, so the VAE stage never recomputes buckets and cannot disagree with ingest.

    The image may be smaller than `original_size` (a JPEG decoded at a DCT scale); it always covers the
    whole picture, so the first resize maps it onto the same geometry.
    """
    import numpy as np
    import torch

    if image.mode != "RGB":
        image = _to_rgb(image, name)
    downsample = _size(_field(sample, "downsample_size"))
    intermediary = _size(_field(sample, "intermediary_size"))
    target = _size(_field(sample, "target_size"))
    crop_box = _field(sample, "crop_box")
    if target is None or intermediary is None or crop_box is None:
        raise InputError(f"{name}: manifest row lacks target_size/intermediary_size/crop_box", field=name)
    lanczos = Image.Resampling.LANCZOS
    if downsample is not None and image.size != downsample:
        image = image.resize(downsample, lanczos, reducing_gap=REDUCING_GAP)
    if image.size != intermediary:
        image = image.resize(intermediary, lanczos, reducing_gap=REDUCING_GAP)
    left, top, right, bottom = (int(v) for v in crop_box)
    image = image.crop((left, top, right, bottom))
    if image.size != target:
        image = image.resize(target, lanczos)
    # numpy, not torch: this runs on helper threads, which must not start OpenMP workers (core/encode.py).
    array = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


__all__ = [
    "PIXEL_PIPELINE",
    "REDUCING_GAP",
    "check_complete",
    "load_image_rgb",
    "load_sample_pixels",
    "prepare_pixels",
    "read_image_size",
]
