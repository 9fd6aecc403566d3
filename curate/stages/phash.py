"""Perceptual hashes of images for near-duplicate checks (imagehash's pHash: 32x32 greyscale,
2-D DCT, the 8x8 lowest frequencies against their median -> 64 bits), packed into one uint64 so
that a Hamming distance is a popcount of an XOR over whole columns."""

from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image


def phash64(img: Image.Image) -> int:
    """imagehash.phash of the image as an unsigned 64-bit integer (row-major bits, MSB first)."""
    bits = np.asarray(imagehash.phash(img).hash, dtype=bool).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of two uint64 arrays, elementwise."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))
