"""Input frames: upstream preprocessing parity, folder / video / npz sources, laziness, errors."""

from __future__ import annotations

import ast
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from _refs import write_video as _write_video
from conftest import REFERENCE, require_reference
from xsvggt_jax.io import video as video_mod
from xsvggt_jax.io.frames import (FrameError, FrameInfo, FrameSource, harmonize_frames, pad_frame, parse_size,
                                  preprocess_image, preprocess_transform, preprocessed_size)
from xsvggt_jax.io.image_files import load_and_preprocess_images
from xsvggt_jax.io.sources import open_frames
from xsvggt_jax.io.rgb import to_uint8_rgb as to_uint8

T = 56  # small target width for speed


def _save(path: Path, size=(56, 42), color=(10, 120, 200), mode="RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


def _noise(path: Path, size=(70, 50), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- parity with upstream

def test_preprocess_parity_518(tmp_path):
    ref_dir = require_reference(REFERENCE / "preprocess_518.npz").parent
    ref = np.load(ref_dir / "preprocess_518.npz")["images"].transpose(0, 2, 3, 1)  # upstream: [S, 3, H, W]
    photos = [ref_dir / "photos" / "0.jpg", ref_dir / "photos" / "4.jpg"]
    np.testing.assert_array_equal(load_and_preprocess_images(photos, mode="crop"), ref)
    for p in photos:  # the lazy folder source gives the same arrays
        shutil.copy(p, tmp_path / p.name)
    src = open_frames(tmp_path)
    assert (src.num_frames, src.height, src.width) == (2, 392, 518)
    frames = list(src)
    assert all(f.dtype == np.float32 for f in frames)
    np.testing.assert_array_equal(np.stack(frames), ref)


# ---------------------------------------------------------------- preprocessing rules

def test_crop_resize_and_center_crop():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 80, 3), dtype=np.uint8))
    out = preprocess_image(img, "crop", T)
    new_h = round(200 * (T / 80) / 14) * 14  # 140 -> centre 56 rows kept
    full = np.asarray(img.resize((T, new_h), Image.Resampling.BICUBIC), np.float32) / 255
    start = (new_h - T) // 2
    np.testing.assert_array_equal(out, full[start:start + T])
    assert preprocessed_size(80, 200, "crop", T) == (T, T)


def test_pad_mode_portrait_padded_white():
    img = Image.new("RGB", (30, 60), (0, 0, 0))
    out = preprocess_image(img, "pad", T)
    assert out.shape == (T, T, 3)
    new_w = round(30 * (T / 60) / 14) * 14  # 28
    left = (T - new_w) // 2
    assert np.all(out[:, :left] == 1.0) and np.all(out[:, left + new_w:] == 1.0)
    assert np.all(out[:, left:left + new_w] == 0.0)


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (T, T), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = preprocess_image(img, "crop", T)
    assert out[20:, 20:].min() == 1.0  # transparent red -> white
    assert out[0, 0, 0] > 0.9 and out[0, 0, 1] < 0.5  # the opaque pixel stays red


def test_grayscale_gives_three_equal_channels(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.arange(T * T, dtype=np.uint8).reshape(T, T)).save(p)
    (frame,) = list(open_frames(p, target=T))
    assert frame.shape == (T, T, 3)
    np.testing.assert_array_equal(frame[..., 0], frame[..., 1])
    np.testing.assert_array_equal(frame[..., 0], frame[..., 2])


def test_harmonize_pads_to_max_white():
    a, b = np.zeros((28, 56, 3), np.float32), np.zeros((56, 42, 3), np.float32)
    pa, pb = harmonize_frames([a, b])
    assert pa.shape == pb.shape == (56, 56, 3)
    assert np.all(pa[:14] == 1) and np.all(pa[42:] == 1) and np.all(pa[14:42] == 0)
    assert np.all(pb[:, :7] == 1) and np.all(pb[:, 49:] == 1) and np.all(pb[:, 7:49] == 0)
    np.testing.assert_array_equal(pad_frame(np.zeros((1, 1, 3), np.float32), 4, 3)[..., 0],
                                  [[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]])


# ---------------------------------------------------------------- folder source

def test_natural_order_and_extensions(tmp_path):
    for i, name in enumerate(["img10.png", "img2.JPG", "img1.jpeg", "IMG3.webp", "img20.PNG"]):
        _save(tmp_path / name, color=(i * 40, 0, 0))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()
    src = open_frames(tmp_path, target=T)
    assert isinstance(src, FrameSource) and src.num_frames == 5 and src.query_points is None
    assert [p.name for p in src.paths] == ["img1.jpeg", "img2.JPG", "IMG3.webp", "img10.png", "img20.PNG"]
    reds = [round(float(f[..., 0].mean()) * 255 / 40) for f in src]
    assert reds == [2, 1, 3, 0, 4]
    assert [p.name for p in open_frames(tmp_path, target=T, stride=2).paths] == [
        "img1.jpeg", "IMG3.webp", "img20.PNG"]


def test_mixed_sizes_padded_with_warning(tmp_path, caplog):
    _noise(tmp_path / "a.png", (56, 56))   # -> 56x56
    _noise(tmp_path / "b.png", (112, 56))  # -> 28x56
    with caplog.at_level(logging.WARNING, logger="xsvggt_jax.io.frames"):
        src = open_frames(tmp_path, target=T)
    assert sum("different sizes" in r.getMessage() for r in caplog.records) == 1
    assert (src.height, src.width) == (56, 56)
    frames = list(src)
    assert [f.shape for f in frames] == [(56, 56, 3)] * 2
    assert np.all(frames[1][:14] == 1.0) and np.all(frames[1][42:] == 1.0)
    eager = harmonize_frames([preprocess_image(Image.open(tmp_path / n), "crop", T) for n in ("a.png", "b.png")])
    np.testing.assert_array_equal(np.stack(frames), np.stack(eager))


def test_folder_is_lazy(tmp_path, monkeypatch):
    for i in range(4):
        _noise(tmp_path / f"f{i}.png", seed=i)
    decoded = []
    orig = ImageFile.ImageFile.load

    def counting_load(self):
        decoded.append(Path(self.filename).name)
        return orig(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    src = open_frames(tmp_path, target=T)  # header pass: no pixel decode
    assert decoded == []
    it = iter(src)
    next(it)
    assert set(decoded) == {"f0.png"}
    next(it)
    assert set(decoded) == {"f0.png", "f1.png"}


# ---------------------------------------------------------------- npz source

def test_npz_source_streams_and_validates(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((5, 3, 28, 42), dtype=np.float32)
    qp = np.array([[1.0, 2.0], [3.0, 4.0]])
    for save in (np.savez, np.savez_compressed):
        p = tmp_path / f"{save.__name__}.npz"
        save(p, images=images, query_points=qp)
        src = open_frames(p)
        assert (src.num_frames, src.height, src.width) == (5, 28, 42)
        assert src.query_points.dtype == np.float32
        np.testing.assert_array_equal(src.query_points, qp)
        frames = list(src)  # [H, W, 3] each, the layout the step takes
        assert all(f.shape == (28, 42, 3) and f.flags.c_contiguous for f in frames)
        np.testing.assert_array_equal(np.stack(frames), images.transpose(0, 2, 3, 1))
        s2 = open_frames(p, stride=2)
        assert s2.num_frames == 3
        np.testing.assert_array_equal(np.stack(list(s2)), images[::2].transpose(0, 2, 3, 1))
    p = tmp_path / "f64.npz"
    np.savez(p, images=images.astype(np.float64))
    assert next(iter(open_frames(p))).dtype == np.float32


@pytest.mark.parametrize("images, match", [
    (np.full((2, 3, 14, 14), np.nan, np.float32), "non-finite"),
    (np.full((2, 3, 14, 14), np.inf, np.float32), "non-finite"),
    (np.zeros((2, 4, 14, 14), np.float32), r"shape \[S, 3, H, W\]"),
    (np.zeros((3, 14, 14), np.float32), r"shape \[S, 3, H, W\]"),
    (np.zeros((0, 3, 14, 14), np.float32), r"S >= 1"),
    (np.zeros((1, 3, 15, 14), np.float32), "multiples of the patch size"),
    (np.zeros((1, 3, 0, 14), np.float32), "multiples of the patch size"),
    (np.zeros((1, 3, 14, 14), np.uint8), "must be float"),
])
def test_npz_errors(tmp_path, images, match):
    p = tmp_path / "bad.npz"
    np.savez(p, images=images)
    with pytest.raises(FrameError, match=match) as e:
        open_frames(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_npz_other_errors(tmp_path):
    p = tmp_path / "noimages.npz"
    np.savez(p, frames=np.zeros((1, 3, 14, 14), np.float32))
    with pytest.raises(FrameError, match="no 'images' array"):
        open_frames(p)
    p = tmp_path / "qp.npz"
    np.savez(p, images=np.zeros((1, 3, 14, 14), np.float32), query_points=np.zeros((3, 3)))
    with pytest.raises(FrameError, match="'query_points' must have shape"):
        open_frames(p)
    np.savez(p, images=np.zeros((1, 3, 14, 14), np.float32), query_points=np.array([[0.0, np.nan]]))
    with pytest.raises(FrameError, match="'query_points' contains non-finite"):
        open_frames(p)
    p = tmp_path / "garbage.npz"
    p.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(FrameError, match="not a readable .npz"):
        open_frames(p)
    p = tmp_path / "trunc.npz"
    with zipfile.ZipFile(p, "w") as zf:  # header says 2 frames, data holds 1
        with zf.open("images.npy", "w") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (2, 3, 14, 14)})
            f.write(np.zeros((1, 3, 14, 14), np.float32).tobytes())
    with pytest.raises(FrameError, match="truncated at frame 1"):
        open_frames(p)


# ---------------------------------------------------------------- errors

def test_missing_path(tmp_path):
    with pytest.raises(FrameError, match="not found") as e:
        open_frames(tmp_path / "nope")
    assert "nope" in str(e.value)


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(FrameError, match="no images") as e:
        open_frames(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_garbage_image_found_in_header_pass(tmp_path):
    _save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"this is not a jpeg" * 20)
    with pytest.raises(FrameError, match="not a readable image") as e:
        open_frames(tmp_path, target=T)
    assert "b.jpg" in str(e.value) and "\n" not in str(e.value)


def test_truncated_image_found_at_decode(tmp_path):
    _noise(tmp_path / "a.png", seed=1)
    data = _noise(tmp_path / "b.png", seed=2).read_bytes()
    (tmp_path / "b.png").write_bytes(data[:len(data) // 2])  # valid header, truncated pixels
    src = open_frames(tmp_path, target=T)
    it = iter(src)
    next(it)
    with pytest.raises(FrameError, match="cannot decode image") as e:
        next(it)
    assert "b.png" in str(e.value)


def test_image_too_small_after_preprocessing(tmp_path):
    _save(tmp_path / "strip.png", size=(400, 4))  # crop at 56 wide -> 0 rows
    with pytest.raises(FrameError, match="smaller than one 14-px patch") as e:
        open_frames(tmp_path, target=T)
    assert "strip.png" in str(e.value)
    with pytest.raises(FrameError, match="smaller than one"):
        preprocess_image(Image.new("RGB", (4, 400)), "pad", T)
    # a tiny but well-proportioned image is upsampled, as upstream does
    (frame,) = list(open_frames(_save(tmp_path / "tiny.png", size=(8, 8)), target=T))
    assert frame.shape == (T, T, 3)


def test_bad_arguments_and_types(tmp_path):
    img = _save(tmp_path / "a.png")
    for kwargs, match in [({"mode": "stretch"}, "mode"), ({"target": 50}, "target"),
                          ({"stride": 0}, "stride"), ({"fps": -1.0}, "fps"),
                          ({"fps": 2.0, "stride": 2}, "either fps or stride"),
                          ({"fps": 2.0}, "videos only")]:
        with pytest.raises(FrameError, match=match):
            open_frames(img, **kwargs)
    other = tmp_path / "data.csv"
    other.write_text("1,2")
    with pytest.raises(FrameError, match="unsupported input type"):
        open_frames(other)


# ---------------------------------------------------------------- video source


def _indices(src):
    return [round(float(f.mean()) * 255 / 20) for f in src]


def test_video_stride_and_fps(tmp_path):
    p = _write_video(tmp_path / "clip.mp4")
    src = open_frames(p, target=T)
    assert (src.num_frames, src.height, src.width) == (10, 42, 56)
    assert _indices(src) == list(range(10))
    s2 = open_frames(p, target=T, stride=2)
    assert s2.num_frames == 5 and _indices(s2) == [0, 2, 4, 6, 8]
    f5 = open_frames(p, target=T, fps=5)
    assert f5.num_frames == 5 and _indices(f5) == [0, 2, 4, 6, 8]
    f3 = open_frames(p, target=T, fps=3)  # frames at or after 0, 1/3, 2/3 s
    assert f3.num_frames == 3 and _indices(f3) == [0, 4, 7]
    f30 = open_frames(p, target=T, fps=30)  # faster than the source: every frame
    assert f30.num_frames == 10
    frame = next(iter(src))
    assert frame.dtype == np.float32 and frame.shape == (42, 56, 3)
    np.testing.assert_allclose([fi.time for fi in f3.frames_info], [0.0, 0.4, 0.7], atol=1e-9)


@pytest.mark.parametrize("name, codec", [("clip.webm", "libvpx"), ("clip.mkv", "ffv1")])
def test_video_without_frame_count(tmp_path, name, codec):
    import av

    p = _write_video(tmp_path / name, n=6, codec=codec)
    with av.open(str(p)) as c:
        assert c.streams.video[0].frames == 0  # the container does not say: counted by demuxing
    src = open_frames(p, target=T)
    assert src.num_frames == 6 and _indices(src) == list(range(6))
    s2 = open_frames(p, target=T, stride=2)
    assert s2.num_frames == 3 and _indices(s2) == [0, 2, 4]
    assert [fi.name for fi in s2.frames_info] == ["frame_000000.jpg", "frame_000002.jpg", "frame_000004.jpg"]
    np.testing.assert_allclose([fi.time for fi in s2.frames_info], [0.0, 0.2, 0.4], atol=1e-9)
    f4 = open_frames(p, target=T, fps=4)  # frames at or after 0, 0.25, 0.5 s
    assert f4.num_frames == 3 and _indices(f4) == [0, 3, 5]
    np.testing.assert_allclose([fi.time for fi in f4.frames_info], [0.0, 0.3, 0.5], atol=1e-9)
    info = f4.frames_info[1]
    assert (info.width, info.height, info.index) == (64, 48, 3)
    originals = list(f4.iter_originals())  # full-size pictures for the exports
    assert [o.shape for o in originals] == [(48, 64, 3)] * 3 and originals[0].dtype == np.uint8
    assert [round(float(o.mean()) / 20) for o in originals] == [0, 3, 5]


def test_video_counted_by_decoding_when_packets_have_no_times(tmp_path, monkeypatch):
    p = _write_video(tmp_path / "clip.webm", n=5, codec="libvpx")
    monkeypatch.setattr(video_mod, "_demuxed_times", lambda path: None)
    src = open_frames(p, target=T, fps=5)
    assert src.num_frames == 3 and _indices(src) == [0, 2, 4]
    np.testing.assert_allclose([fi.time for fi in src.frames_info], [0.0, 0.2, 0.4], atol=1e-9)


def test_video_garbage(tmp_path):
    p = tmp_path / "broken.mp4"
    p.write_bytes(b"definitely not a video" * 100)
    with pytest.raises(FrameError, match="cannot decode video") as e:
        open_frames(p)
    assert "broken.mp4" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- colour modes

GREY16 = np.array([0, 1000, 30000, 65535], np.uint16)


def _decode_png(tmp_path: Path, img: Image.Image, **save) -> np.ndarray:
    """Save `img` as PNG, read it back through open_frames: [T, T, 3] values in [0, 1]."""
    p = tmp_path / "m.png"
    img.save(p, **save)
    (frame,) = list(open_frames(p, target=T))
    return frame


def _tile(values: np.ndarray) -> np.ndarray:
    """A T x T array whose columns cycle through `values` (T is a multiple of their count)."""
    return np.tile(values, (T, T // len(values)))


def test_16bit_grey_scaled_not_white(tmp_path):
    grey = _tile(GREY16)
    want = np.rint(grey.astype(np.float64) * 255 / 65535) / 255
    img = Image.frombytes("I;16B", (T, T), grey.astype(">u2").tobytes())
    got = _decode_png(tmp_path, img)  # a 16-bit PNG reopens as I;16
    np.testing.assert_allclose(got, np.repeat(want[..., None], 3, -1), atol=1e-7)
    for mode, data in (("I", grey.astype("<i4")), ("I;16", grey.astype("<u2"))):  # in-memory modes
        out = preprocess_image(Image.frombytes(mode, (T, T), data.tobytes()), "crop", T)
        np.testing.assert_allclose(out[..., 1], want, atol=1e-7)


def test_float_and_1bit_modes(tmp_path):
    f = _tile(np.array([0.0, 0.25, 0.5, 1.0], np.float32))
    out = preprocess_image(Image.fromarray(f, "F"), "crop", T)
    np.testing.assert_allclose(out[..., 0], np.rint(f * 255) / 255, atol=1e-7)
    bits = _tile(np.array([0, 1], bool))
    got = _decode_png(tmp_path, Image.fromarray(bits))
    np.testing.assert_array_equal(got[..., 2], bits.astype(np.float32))


@pytest.mark.parametrize("alpha", [0, 128, 255])
def test_grey_alpha_composited_like_rgba(tmp_path, alpha):
    la = Image.new("LA", (T, T), (60, alpha))
    rgba = Image.new("RGBA", (T, T), (60, 60, 60, alpha))
    got = _decode_png(tmp_path, la)
    np.testing.assert_array_equal(got, preprocess_image(rgba, "crop", T))
    want = {0: 1.0, 255: 60 / 255}.get(alpha)
    if want is not None:  # fully transparent -> white, opaque -> its grey
        np.testing.assert_allclose(got, want, atol=1e-7)
    pa = Image.new("RGBA", (T, T), (60, 60, 60, alpha)).convert("PA")  # in-memory only (no PNG writer)
    np.testing.assert_array_equal(preprocess_image(pa, "crop", T), preprocess_image(rgba, "crop", T))
    premult = Image.new("LA", (T, T), (60, alpha)).convert("La")
    np.testing.assert_allclose(preprocess_image(premult, "crop", T), preprocess_image(rgba, "crop", T), atol=2 / 255)


def test_palette_and_colour_key_transparency_white(tmp_path):
    pal = Image.new("P", (T, T), 0)
    pal.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    pal.paste(1, (0, 0, T // 2, T))  # left half: palette entry 1, right half: entry 0 (transparent)
    got = _decode_png(tmp_path, pal, transparency=0)
    np.testing.assert_allclose(got[:, T // 2:], 1.0)
    np.testing.assert_allclose(got[:, :T // 2], np.broadcast_to(np.array([200, 30, 10]) / 255, (T, T // 2, 3)),
                               atol=1e-7)
    grey = Image.fromarray(_tile(np.array([7, 90], np.uint8)))  # tRNS on grey: level 7 is transparent
    got = _decode_png(tmp_path, grey, transparency=7)
    np.testing.assert_allclose(got[:, 0::2], 1.0)
    np.testing.assert_allclose(got[:, 1::2], 90 / 255, atol=1e-7)
    rgb = Image.new("RGB", (T, T), (1, 2, 3))
    rgb.paste((100, 50, 25), (0, 0, 8, 8))
    got = _decode_png(tmp_path, rgb, transparency=(1, 2, 3))  # tRNS colour key on RGB
    np.testing.assert_allclose(got[8:], 1.0)
    np.testing.assert_allclose(got[0, 0], np.array([100, 50, 25]) / 255, atol=1e-7)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "c.jpg"
    Image.new("CMYK", (T, T), (255, 0, 0, 0)).save(p, quality=100)  # pure cyan
    (frame,) = list(open_frames(p, target=T))
    np.testing.assert_allclose(frame[T // 2, T // 2], [0.0, 1.0, 1.0], atol=3 / 255)


def test_to_uint8():
    frames = np.array([0.0, 0.5 / 255, 1.0, 1.5, -0.2, np.nan], np.float32).reshape(1, 6, 1, 1)
    out = to_uint8(np.repeat(frames, 3, axis=-1))
    assert out.dtype == np.uint8 and out.shape == (1, 6, 1, 3)
    assert out[0, :, 0, 0].tolist() == [0, 0, 255, 255, 0, 0]
    with pytest.raises(ValueError):
        to_uint8(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError):  # channels first
        to_uint8(np.zeros((2, 3, 4, 4)))


# ---------------------------------------------------------------- where frames came from

def _marker_centroid(frame: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid, in continuous pixel coordinates, of the dark pixels of an [H, W, 3] frame."""
    dark = frame.mean(-1) < 0.5
    ys, xs = np.nonzero(dark)
    weights = 1.0 - frame.mean(-1)[dark]
    return float(np.average(xs + 0.5, weights=weights)), float(np.average(ys + 0.5, weights=weights))


@pytest.mark.parametrize("mode, size, target", [("crop", (80, 200), T), ("crop", (140, 70), T), ("pad", (60, 150), T),
                                                ("pad", (150, 60), T), ("crop", (300, 80), (42, 56)),
                                                ("crop", (80, 150), (28, 70)), ("pad", (60, 150), (42, 56)),
                                                ("pad", (150, 60), (28, 112))])
def test_transform_maps_original_points_into_the_frame(mode, size, target):
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    x0, y0 = int(w * 0.4), int(h * 0.45)  # a 10 x 10 black marker, centre (x0 + 5, y0 + 5)
    img.paste((0, 0, 0), (x0, y0, x0 + 10, y0 + 10))
    frame = preprocess_image(img, mode, target)
    sx, sy, ox, oy = preprocess_transform(w, h, mode, target)
    cx, cy = _marker_centroid(frame)
    assert abs(cx - (sx * (x0 + 5) + ox)) < 0.3 and abs(cy - (sy * (y0 + 5) + oy)) < 0.3


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_a_fixed_size_is_exact_and_equals_upstream_at_upstream_sizes(mode):
    """--size HxW: every image becomes exactly H x W (crop: covers it, pad: fits in it); at the size
    upstream's rule gives an image (crop: its natural height, pad: the square) the frame is upstream's,
    bit for bit."""
    rng = np.random.default_rng(1)
    for w, h in [(70, 50), (50, 70), (90, 90), (120, 45), (40, 100)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for size in [(28, 56), (56, 28), (42, 42)]:
            assert preprocess_image(img, mode, size).shape == (*size, 3), (w, h, size)
            assert preprocessed_size(w, h, mode, size) == size
        natural = preprocessed_size(w, h, mode, T)
        np.testing.assert_array_equal(preprocess_image(img, mode, natural), preprocess_image(img, mode, T))


@pytest.mark.parametrize("text", ["84x112", "84X112", " 84x112"])
def test_parse_size(text):
    assert parse_size(text.strip()) == (84, 112)


@pytest.mark.parametrize("text", ["84", "84x100", "0x14", "axb", "14x14x14", "-14x14"])
def test_parse_size_refuses(text):
    with pytest.raises(FrameError, match="multiples of the patch size 14"):
        parse_size(text)


def test_frames_info_of_a_folder(tmp_path):
    _save(tmp_path / "a.png", size=(56, 56))
    _save(tmp_path / "b.png", size=(112, 56))  # -> 28 x 56, padded by 14 rows above to the common 56 x 56
    src = open_frames(tmp_path, target=T)
    a, b = src.frames_info
    assert (a.name, a.width, a.height, a.time) == ("a.png", 56, 56, None)
    assert (b.name, b.width, b.height) == ("b.png", 112, 56)
    assert (b.scale_x, b.scale_y, b.offset_x, b.offset_y) == (0.5, 0.5, 0.0, 14.0)
    assert list(src.iter_originals()) == [tmp_path / "a.png", tmp_path / "b.png"]
    # intrinsics of the model frame -> the original image: A @ K_original == K
    k = np.array([[40.0, 0, 28], [0, 41.0, 28], [0, 0, 1]])
    k_orig = b.intrinsics_to_original(k)
    np.testing.assert_allclose(k_orig, [[80.0, 0, 56], [0, 82.0, 28], [0, 0, 1]])


def test_default_frames_info_and_npz():
    src = FrameSource("x", 2, 28, 42)
    assert src.frames_info == [FrameInfo("frame_000000.png", 42, 28, index=0),
                               FrameInfo("frame_000001.png", 42, 28, index=1)]
    with pytest.raises(ValueError):
        FrameSource("x", 2, 28, 42, frames_info=src.frames_info[:1])


# ---------------------------------------------------------------- module structure

def test_io_modules_import_each_other_without_a_cycle():
    """frames (shared) <- image_files, video <- sources (open_frames): no cycle among the io modules,
    function-level imports included (frames used to import video lazily, video imported frames)."""
    io_dir = Path(__file__).resolve().parents[1] / "xsvggt_jax" / "io"
    graph = {}
    for path in io_dir.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "xsvggt_jax.io":
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xsvggt_jax.io."):
                deps.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("xsvggt_jax.io."))
        graph[path.stem] = deps - {path.stem}
    assert {"frames", "image_files", "video", "sources"} <= set(graph)

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d))) for d in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m)] == []

