"""Image bytes to uint8 RGB tensors: the one decoder of the package (torchvision's libjpeg/libpng,
Pillow for other formats), the header check against decompression bombs, and the read of one file
with its errors named.

Both the in-memory datasets (:mod:`curlprune.data.data`) and the streamed ones
(:mod:`curlprune.data.streaming`) decode here, so both give the same pixels for the same file.
"""
from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Callable

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from curlprune.errors import CurlpruneError

__all__ = ["MAX_IMAGE_PIXELS", "decode_rgb", "image_size", "read_file"]

# Larger images are refused before decoding: a few KiB of PNG can claim gigapixels (a
# "decompression bomb"). 8192 x 8192; far above any training image.
MAX_IMAGE_PIXELS = 8192 * 8192


def read_file(reader: Callable[[str], bytes], name: str, where: str) -> bytes:
    """``reader(name)``; a read error is a :class:`CurlpruneError` naming ``where``."""
    try:
        return reader(name)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CurlpruneError(f"cannot read {where} ({exc}): the archive or disk is damaged; copy or download the data again") from None


def decode_rgb(data: bytes, where: str) -> torch.Tensor:
    """Decode image bytes to 8-bit RGB, uint8 ``[3, H, W]``; ``where`` names the file in errors.

    16-bit images are scaled to 8 bits (v * 255 / 65535); grey, palette and alpha images become RGB.

    Args:
        data: the file's bytes.
        where: names the file in errors.
    Returns:
        uint8 ``[3, H, W]``.
    Raises:
        CurlpruneError: naming the file when it is damaged, not an image, has more than
            :data:`MAX_IMAGE_PIXELS` pixels, or cannot be represented as 8-bit RGB (e.g. float data).
    """
    _check_size(data, where)
    try:  # libjpeg/libpng/libwebp through torchvision: fast
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        image = _decode_pil(data, where)
    if image.dtype == torch.uint16:  # 16-bit PNG
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise CurlpruneError(f"cannot use image {where}: it decodes to {image.dtype} {list(image.shape)}, not 8-bit RGB; convert it to 8-bit RGB")
    return image


def _check_size(data: bytes, where: str) -> None:
    """Refuse images with more than MAX_IMAGE_PIXELS pixels from their header, before decoding."""
    size = image_size(data)
    if size is None:
        return  # not something we can size: the decoders below decide
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise CurlpruneError(
            f"image {where} is {width} x {height} = {width * height:,} pixels, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,} (8192 x 8192; a decompression bomb or a mistake): resize or remove it"
        )


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_size(data: bytes) -> tuple[int, int] | None:
    """An image's size from its header, without decoding it (PNG and JPEG read directly, other
    formats through Pillow's lazy open).

    Args:
        data: the file's bytes.
    Returns:
        ``(width, height)`` in pixels, or None when the bytes are not a recognised image.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":  # JPEG: walk the segments to the frame header (SOFn)
        i = 2
        while i + 9 <= len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if marker == 0xFF:
                i += 1
            elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
                i += 2
            elif marker in _SOF_MARKERS:
                return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
            else:
                i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    from PIL import Image, UnidentifiedImageError  # only for formats other than PNG/JPEG

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _decode_pil(data: bytes, where: str) -> torch.Tensor:
    """Other formats (BMP, TIFF, ...) through Pillow, as uint8 RGB ``[3, H, W]``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked
            with Image.open(io.BytesIO(data)) as img:
                if img.mode.startswith("I;16"):
                    array = np.asarray(img).astype(np.int64)
                    return torch.from_numpy(((array * 255 + 32767) // 65535).astype(np.uint8)).expand(3, -1, -1).contiguous()
                if img.mode in ("I", "F") or img.mode.startswith(("I;", "F;")):
                    raise CurlpruneError(
                        f"cannot use image {where}: it holds {img.mode!r} (32-bit integer or float) pixels, which have no "
                        "fixed 8-bit scale; convert it to 8-bit RGB"
                    )
                array = torch.from_numpy(np.array(img.convert("RGB")))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow's own text for an unknown format names its in-memory buffer object, which says nothing to a user
        why = "no image format Pillow knows" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise CurlpruneError(f"cannot decode image {where} ({why}): the file is damaged or not an image; replace or remove it") from None
    return array.permute(2, 0, 1).contiguous()
