"""A hand-built matrix/TRC ICC profile (Adobe RGB (1998) primaries, gamma 2.2) and a naive reference conversion.

No ICC file ships with the test machine, so the profile is written byte by byte from the ICC v2 layout; the
expected sRGB values come from plain numpy matrix arithmetic, independent of littlecms.
"""

from __future__ import annotations

import struct

import numpy as np

# D50-adapted colorants (the XYZ of each primary as the profile stores them), from the Adobe RGB and sRGB ICC profiles.
ADOBE_RGB_D50 = np.array([[0.6097, 0.2053, 0.1492], [0.3111, 0.6257, 0.0632], [0.0195, 0.0609, 0.7446]])
SRGB_D50 = np.array([[0.4361, 0.3851, 0.1431], [0.2225, 0.7169, 0.0606], [0.0139, 0.0971, 0.7141]])
D50 = (0.9642, 1.0, 0.8249)
GAMMA = 563 / 256  # Adobe RGB's 2.19921875, exactly representable as u8Fixed8


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(x, y, z) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)


def _curve(gamma: float) -> bytes:
    return b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", round(gamma * 256)) + b"\0\0"


def _desc(text: str) -> bytes:
    ascii_ = text.encode() + b"\0"
    return (b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * 8 + b"\0" * 3 + b"\0" * 67)


def adobe_rgb_profile() -> bytes:
    tags = [(b"desc", _desc("mirip test Adobe RGB")), (b"wtpt", _xyz(*D50))]
    for i, sig in enumerate((b"rXYZ", b"gXYZ", b"bXYZ")):
        tags.append((sig, _xyz(*ADOBE_RGB_D50[:, i])))
    for sig in (b"rTRC", b"gTRC", b"bTRC"):
        tags.append((sig, _curve(GAMMA)))
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntr" + b"RGB " + b"XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 4 + b"\0" * 4 + b"\0" * 8 + b"\0" * 8 + b"\0" * 4
              + _s15(D50[0]) + _s15(D50[1]) + _s15(D50[2]) + b"\0" * 4 + b"\0" * 16 + b"\0" * 28)
    assert len(header) == 128
    return header + table + data


def adobe_to_srgb_reference(rgb8: np.ndarray) -> np.ndarray:
    """Adobe RGB 8-bit -> linear -> XYZ (D50) -> linear sRGB -> sRGB-encoded 8-bit, all in numpy."""
    lin = (np.asarray(rgb8, dtype=np.float64) / 255.0) ** GAMMA
    xyz = lin @ ADOBE_RGB_D50.T
    srgb_lin = np.clip(xyz @ np.linalg.inv(SRGB_D50).T, 0.0, 1.0)
    enc = np.where(srgb_lin <= 0.0031308, 12.92 * srgb_lin, 1.055 * srgb_lin ** (1 / 2.4) - 0.055)
    return np.round(enc * 255.0)
