"""Bad and unusual inputs give upright RGB or one clear ImageLoadError."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from retrieval.images import (ImageLoadError, crop_box, load_image, parse_box, prepare_query,
                              resize_max_side)


def _bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    assert load_image(_bytes(rgba)).getpixel((0, 0)) == (255, 255, 255)   # transparent → white
    assert load_image(_bytes(Image.new("L", (20, 10), 77))).getpixel((3, 3)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (20, 10), (0, 255, 255, 0))
    assert load_image(_bytes(cmyk, "JPEG")).mode == "RGB"
    sixteen = Image.fromarray(np.linspace(0, 65535, 200).reshape(10, 20).astype(np.uint16))
    out = load_image(_bytes(sixteen))
    assert out.mode == "RGB" and out.getpixel((19, 9))[0] == 255
    pal = Image.new("P", (12, 12))
    assert load_image(_bytes(pal)).mode == "RGB"


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = load_image(_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


@pytest.mark.parametrize("payload,needle", [
    (b"", "empty"), (b"hello, I am a text file" * 10, "not a readable image"),
    (_bytes(Image.new("RGB", (64, 64)), "JPEG")[:200], "corrupt"),
])
def test_broken_bytes(payload, needle):
    with pytest.raises(ImageLoadError, match=needle):
        load_image(payload)


def test_missing_tiny_and_bomb(tmp_path):
    with pytest.raises(ImageLoadError, match="does not exist"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="at least"):
        load_image(_bytes(Image.new("RGB", (1, 1))))
    # a PNG header claiming 100000×100000 pixels: refused before decoding
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    def png_chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
           + png_chunk(b"IEND", b""))
    with pytest.raises(ImageLoadError, match="pixels"):
        load_image(png)
    with pytest.raises(ImageLoadError):
        load_image(np.zeros((0, 3)))


def test_boxes_and_crops():
    img = Image.new("RGB", (100, 50))
    assert parse_box("1, 2,30,40") == (1, 2, 30, 40)
    for bad in ("1,2,3", "a,b,c,d", "5,5,5,9", [0, 0, float("nan"), 3]):
        with pytest.raises(ValueError):
            parse_box(bad)
    with pytest.raises(ImageLoadError, match="too small"):
        crop_box(img, (10, 10, 11, 11))
    assert crop_box(img, (-20, -5, 40, 30)).size == (40, 30)


def test_query_uses_gallery_resize_rule():
    src = Image.new("RGB", (1280, 960))
    patch = prepare_query(src, (100, 100, 300, 260), max_side=640)
    assert patch.size == (100, 80)
    assert resize_max_side(src, 640)[1] == 0.5
    with pytest.raises(ImageLoadError):
        prepare_query(src, (0, 0, 1, 1), max_side=640)


def test_size_batches_group_equal_sizes_in_first_seen_order():
    from retrieval.images import size_batches

    sizes = [(4, 3), (2, 2), (4, 3), (4, 3), (2, 2), (4, 3), (9, 9)]
    assert size_batches(sizes, 2) == [[0, 2], [3, 5], [1, 4], [6]]
    assert size_batches(sizes, 10) == [[0, 2, 3, 5], [1, 4], [6]]
    assert size_batches([], 3) == []


def test_padded_batches_group_similar_sizes_within_the_padding_budget():
    from retrieval.images import padded_batches

    sizes = [(640, 480), (320, 240), (630, 470), (640, 480), (318, 240), (480, 640), (64, 64), (640, 476)]
    batches = padded_batches(sizes, batch_size=3, max_padding=0.25)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    for batch in batches:
        assert len(batch) <= 3
        width = max(sizes[i][0] for i in batch)
        height = max(sizes[i][1] for i in batch)
        assert width * height * len(batch) <= 1.25 * sum(sizes[i][0] * sizes[i][1] for i in batch)
    together = next(b for b in batches if 1 in b)
    assert 4 in together                       # 320×240 and 318×240 share a batch
    assert not any(6 in b and len(b) > 1 for b in batches)   # 64×64 pads too much next to anything
    assert padded_batches([(5, 5)] * 7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert padded_batches([], 3) == []
