"""Image reading: every Pillow mode to correct RGB, EXIF rotation, and bad files as per-file errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stagetune.core.errors import InputError
from stagetune.core.imaging import (
    check_complete,
    load_image_rgb,
    load_sample_pixels,
    prepare_pixels,
    read_image_size,
)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_rgb_png_and_jpeg(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 30), (200, 10, 50))
    png = _save(image, tmp_path / "a.png")
    jpg = _save(image, tmp_path / "a.jpg", quality=95)
    assert read_image_size(png) == (40, 30)
    assert read_image_size(jpg) == (40, 30)
    assert load_image_rgb(png).getpixel((5, 5)) == (200, 10, 50)
    r, g, b = load_image_rgb(jpg).getpixel((5, 5))
    assert abs(r - 200) < 6 and abs(g - 10) < 6 and abs(b - 50) < 6


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))
    out = load_image_rgb(_save(image, tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent → white, not red
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))  # half black over white


def test_la_and_p_with_transparency(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    out = load_image_rgb(_save(la, tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)

    p = Image.new("P", (2, 1), 0)
    p.putpalette([10, 20, 30, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    out = load_image_rgb(_save(p, tmp_path / "p.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 255, 0)

    opaque = Image.new("P", (1, 1), 0)
    opaque.putpalette([10, 20, 30] + [0] * 765)
    assert load_image_rgb(_save(opaque, tmp_path / "po.png")).getpixel((0, 0)) == (10, 20, 30)


def test_l_and_cmyk(tmp_path: Path) -> None:
    out = load_image_rgb(_save(Image.new("L", (3, 3), 77), tmp_path / "l.png"))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image_rgb(_save(cmyk, tmp_path / "c.jpg", quality=100))
    r, g, b = out.getpixel((4, 4))
    assert out.mode == "RGB" and r > 240 and g < 15 and b < 15
    out = load_image_rgb(_save(cmyk, tmp_path / "c.tif"))
    assert out.getpixel((4, 4)) == (255, 0, 0)


def test_16_bit_grey_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    path = _save(image, tmp_path / "g16.png")
    reopened = Image.open(path)
    assert reopened.mode in ("I;16", "I")
    out = load_image_rgb(path)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    # mode "I" (32-bit) from the same data
    out = load_image_rgb(_save(Image.fromarray(values.astype(np.int32)), tmp_path / "g32.tif"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def _exif_rotated(tmp_path: Path, orientation: int) -> Path:
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(image, tmp_path / f"o{orientation}.jpg", exif=exif.tobytes(), quality=95)


def test_exif_rotation_size_and_pixels(tmp_path: Path) -> None:
    path = _exif_rotated(tmp_path, 6)  # rotate 90° clockwise for display
    assert read_image_size(path) == (20, 60)
    out = load_image_rgb(path)
    assert out.size == (20, 60)
    r, g, b = out.getpixel((10, 3))  # left stripe is now at the top
    assert r > 200 and b < 60
    assert read_image_size(_exif_rotated(tmp_path, 3)) == (60, 20)  # 180° keeps the size
    assert read_image_size(_exif_rotated(tmp_path, 8)) == (20, 60)


@pytest.mark.parametrize("kind", ["zero", "text", "truncated_png", "truncated_jpeg", "missing"])
def test_bad_files_raise_input_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.png"
    if kind == "zero":
        path.write_bytes(b"")
        expected = "empty"
    elif kind == "text":
        path.write_text("this is not an image\n" * 10)
        expected = "not an image"
    elif kind == "truncated_png":
        buf = io.BytesIO()
        Image.effect_noise((128, 128), 50).convert("RGB").save(buf, "PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        expected = "truncated"
    elif kind == "truncated_jpeg":
        path = tmp_path / "t.jpg"
        buf = io.BytesIO()
        Image.effect_noise((128, 128), 50).convert("RGB").save(buf, "JPEG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        expected = "truncated"
    else:
        expected = "not found"
    with pytest.raises(InputError) as info:
        load_image_rgb(path)
        if kind.startswith("truncated"):
            check_complete(path.read_bytes(), name=str(path))
    assert str(path) in str(info.value) and expected in str(info.value).lower()
    if kind.startswith("truncated"):
        assert read_image_size(path) == (128, 128)  # the header alone looks fine …
        with pytest.raises(InputError, match="truncated"):  # … so ingest checks the end marker
            check_complete(path.read_bytes(), name=str(path))
    else:
        with pytest.raises(InputError):
            read_image_size(path)


def test_decompression_bomb_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("L", (300, 300)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    for call in (read_image_size, load_image_rgb):
        with pytest.raises(InputError) as info:
            call(path)
        assert "too large" in str(info.value) and "big.png" in str(info.value)
    # between the limit and twice the limit Pillow only warns: still an error here
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)
    with pytest.raises(InputError, match="too large"):
        read_image_size(path)


def test_huge_dimension_header_without_pixels(tmp_path: Path) -> None:
    """A PNG header claiming 100k × 100k pixels is refused from the header, before any allocation."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    with pytest.raises(InputError, match="too large"):
        read_image_size(path)
    with pytest.raises(InputError, match="too large"):
        load_image_rgb(path)


def test_bytes_source() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (9, 7)).save(buf, "PNG")
    assert read_image_size(buf.getvalue(), name="x.png") == (9, 7)
    with pytest.raises(InputError, match="x.png: empty"):
        read_image_size(b"", name="x.png")


def test_prepare_pixels_geometry_and_range() -> None:
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 150, 200))  # left half black
    row = {
        "path": "mem.png",
        "original_size": [300, 200],
        "downsample_size": [150, 100],
        "intermediary_size": [96, 64],
        "crop_box": [16, 0, 80, 64],
        "target_size": [64, 64],
    }
    tensor = prepare_pixels(image, row)
    assert tuple(tensor.shape) == (3, 64, 64) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= -1.0 and float(tensor.max()) <= 1.0
    assert float(tensor[:, :, 0].mean()) == pytest.approx(-1.0, abs=0.02)  # black → -1
    assert float(tensor[:, :, -1].mean()) == pytest.approx(1.0, abs=0.02)  # white → +1
    # a box clipped at the edge is still resized to exactly the target
    clipped = {**row, "downsample_size": None, "intermediary_size": [300, 200], "crop_box": [0, 0, 300, 200]}
    assert tuple(prepare_pixels(image, clipped).shape) == (3, 64, 64)
    with pytest.raises(InputError, match="manifest says"):
        prepare_pixels(image, {**row, "original_size": [10, 10]})


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_header_read_from_bytes_matches_every_format(fmt: str) -> None:
    """Bytes are opened with a format hint from their magic number; formats without one are probed as before."""
    buf = io.BytesIO()
    Image.new("RGB", (13, 5), (10, 20, 30)).save(buf, fmt)
    assert read_image_size(buf.getvalue(), name=f"x.{fmt.lower()}") == (13, 5)
    assert load_image_rgb(buf.getvalue(), name=f"x.{fmt.lower()}").size == (13, 5)


def test_magic_number_that_lies_is_probed_as_any_other_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hint that names the wrong format costs a retry, never a good image."""
    import stagetune.core.imaging as imaging

    buf = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buf, "PNG")
    monkeypatch.setattr(imaging, "_MAGIC", ((b"\x89PNG", 0, "JPEG"),))
    assert read_image_size(buf.getvalue(), name="x.png") == (8, 6)
    assert load_image_rgb(buf.getvalue(), name="x.png").size == (8, 6)
    with pytest.raises(InputError, match="x.jpg: not an image"):
        read_image_size(b"\x89PNG" + b"\x00" * 64, name="x.jpg")


def _photo_like(width: int, height: int) -> Image.Image:
    """Smooth gradients plus edges: a stand-in for a photograph (noise would be a worst case no photo is)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0)
    g = 255 * x / width
    b = np.where((x // 120 + y // 90) % 2 == 0, 40, 210)
    return Image.fromarray(np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("orientation", [1, 6])
def test_sample_pixels_decode_big_jpegs_small_and_match_a_full_decode(tmp_path: Path, orientation: int) -> None:
    """A JPEG far bigger than its target decodes at a DCT scale: a smaller decode, the same picture."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(_photo_like(1600, 1000), tmp_path / "big.jpg", quality=92, exif=exif.tobytes())
    shown = (1600, 1000) if orientation == 1 else (1000, 1600)
    inter = (96, 60) if orientation == 1 else (60, 96)
    box = [16, 0, 80, 60] if orientation == 1 else [0, 16, 60, 80]
    row = {"path": str(path), "original_size": list(shown), "downsample_size": None,
           "intermediary_size": list(inter), "crop_box": box, "target_size": [64, 60] if orientation == 1 else [60, 64]}
    full = prepare_pixels(load_image_rgb(path), row)
    fast = load_sample_pixels(path, row)
    assert fast.shape == full.shape
    mse = float(((fast - full) * 127.5).pow(2).mean())
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 40  # dB PSNR, in 8-bit units

    decoded: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def spy(self):  # noqa: ANN001, ANN202 - records the size Pillow decodes at
        decoded.append(self.size)
        return real_load(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image.Image, "load", spy)
        load_sample_pixels(path, row)
    stored_w = decoded[0][0] if orientation == 1 else decoded[0][1]
    assert stored_w * 2 <= 1600 and stored_w >= 3 * inter[0]  # decoded ≥ 1/2 smaller, and ≥ 3× the target


def test_sample_pixels_equal_prepare_pixels_when_nothing_can_be_skipped(tmp_path: Path) -> None:
    path = _save(_photo_like(300, 200), tmp_path / "a.png")
    row = {"path": str(path), "original_size": [300, 200], "downsample_size": [150, 100],
           "intermediary_size": [96, 64], "crop_box": [16, 0, 80, 64], "target_size": [64, 64]}
    assert torch.equal(load_sample_pixels(path, row), prepare_pixels(load_image_rgb(path), row))
    with pytest.raises(InputError, match="image is 300x200 but the manifest says 10x10"):
        load_sample_pixels(path, {**row, "original_size": [10, 10]})
