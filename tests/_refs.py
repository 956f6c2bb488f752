"""What several test files share: independent reference implementations, parity tolerances, test data
writers. Test files import these from here (fixtures and small helpers from conftest.py), never from
each other.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from conftest import rel_err

# ------------------------------------------------------------------- parity with upstream (tiny)
OUTPUTS = ("pts3d_in_other_view", "conf", "depth", "depth_conf", "camera_pose", "track", "vis", "track_conf")
TOL = 1e-5  # relative error, every output and intermediate

# Offline track *scores* (vis, track_conf) sit at upstream's own float32 noise floor: the tracker embeds
# flows as sin/cos(flow * k * 1000 / C), so a 1e-7 relative change of a coordinate moves the embedding by
# ~1e-4. Measured with the upstream PyTorch code: its float32 result differs from its own float64 result
# by 1.1e-5 (vis) / 1.1e-5 (conf), and perturbing its input feature maps by 1e-7 changes vis by 1.3e-5.
# No float32 implementation can match it tighter than that noise, so these two get 3e-5. Tracks
# themselves, and every streaming output (S = 1 there, flows are exactly 0), keep 1e-5.
OFFLINE_TRACK_SCORE_TOL = 3e-5

# Quantized runs: a float difference can flip a code by one step (reference README), so they get their
# own bounds, each <= 2x what this port measures (float32 CPU, max over outputs of the relative error)
# (the other quantized bounds are in test_parity.py):
KTVT_TOL = 4e-5              # per-token K and V + xstream pruning, whole stream: see KTVT_NEAR_TIE_FRAME

# Per-token KTVT + pruning: the reference stream sits within float32 noise of a code flip at frame 11.
# Frames 0-10 match it to <= 1.7e-6 (every output, each frame) on the CPU and on an H200 GPU alike; at
# frame 11 one rounding of x / scale lands within float32 noise of a code boundary, so which code it
# gets (and frame 11's outputs) depends on summation order. Measured, max over outputs (2026-11-26):
#   CPU float32                          frame 11: 3.1e-5, frame 12: 4.3e-6, whole stream 6.65e-6
#   H200 GPU float32 ("highest" matmuls: frame 11: 7.5e-5, frame 12: 6.7e-5, whole stream 1.98e-5
#     no TF32)
#   CPU, input frames * (1 + 1e-7 N(0,1)), 4 seeds: 3 land on the CPU's state (6.6e-6), 1 on the GPU's (1.99e-5).
# The uncompressed stream is at 1.3e-6 (CPU) / 1.4e-6 (H200) on every frame: the flip is the code's, not
# the port's. So frames before KTVT_NEAR_TIE_FRAME are held to TOL frame by frame (the flips measured
# here move their frame by 3.1e-5 to 7.5e-5), and the whole stream to 2x the worst state measured
# (KTVT_TOL = 4e-5). Before this, a whole-stream 1e-5 failed on the H200 and on a 1e-7 perturbation of
# the input, while letting frame 11 alone sit at 3.1e-5 on the CPU.
KTVT_NEAR_TIE_FRAME = 11


def ktvt_errors(out, ref) -> tuple[dict, dict]:
    """(max relative error per frame before KTVT_NEAR_TIE_FRAME, per output over the whole stream), as
    bounded by TOL and KTVT_TOL."""
    head = {f: max(rel_err(out[k][f], ref[k][f]) for k in OUTPUTS) for f in range(KTVT_NEAR_TIE_FRAME)}
    return head, {k: rel_err(out[k], ref[k]) for k in OUTPUTS}


def assert_ktvt_parity(out, ref) -> None:
    head, whole = ktvt_errors(out, ref)
    print("KTVT relative errors per frame before the near tie:", head, "whole stream:", whole)
    assert max(head.values()) <= TOL, head
    assert max(whole.values()) <= KTVT_TOL, whole


# -------------------------------------------------------------------- quantizer (numpy reference)
def ref_quant_lastaxis(x: np.ndarray, bits: int, gs: int, eps: float = 1e-12):
    """Upstream formula along the last axis, float32 throughout. Returns (dequant, q, scale, zero)
    with q / dequant cut to x's length and scale / zero of shape [..., G]."""
    x = np.asarray(x, np.float32)
    L = x.shape[-1]
    G = -(-L // gs)
    xp = np.zeros(x.shape[:-1] + (G * gs,), np.float32)
    xp[..., :L] = x
    xp = xp.reshape(x.shape[:-1] + (G, gs))
    maxq = 2**bits - 1
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        xmax = xp.max(-1, keepdims=True)
        xmin = xp.min(-1, keepdims=True)
        scale = np.maximum((xmax - xmin) / np.float32(maxq), np.float32(eps))
        zero = np.round(-xmin / scale)
        zero = np.clip(np.nan_to_num(zero, nan=0, posinf=maxq, neginf=0), 0, maxq)
        q = np.round(xp / scale) + zero
        q = np.clip(np.nan_to_num(q, nan=0, posinf=maxq, neginf=0), 0, maxq)
        deq = scale * (q - zero)
    for a in (scale, zero, q, deq):
        assert a.dtype == np.float32
    cut = lambda a: a.reshape(x.shape[:-1] + (G * gs,))[..., :L]
    return cut(deq), cut(q), scale[..., 0], zero[..., 0]


def ref_quant(x, bits, gs, axis=-1, eps=1e-12):
    """Any axis: move it last (upstream's transpose), quantize, move back."""
    deq, q, s, z = ref_quant_lastaxis(np.moveaxis(np.asarray(x), axis, -1), bits, gs, eps)
    return tuple(np.moveaxis(a, -1, axis) for a in (deq, q, s, z))


# ------------------------------------------------------------------------------------- test data
def write_video(path: Path, n=10, fps=10, size=(64, 48), codec="libx264", images=None):
    """A small clip at `path`: frame i is filled with grey level 20 * i (so the kept indices can be
    read back), or is images[i] (uint8 [n, h, w, 3]; `n` and `size` then come from them). Returns path."""
    import av

    if images is not None:
        n, size = len(images), (images.shape[2], images.shape[1])
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p" if codec != "ffv1" else "bgr0"
        for i in range(n):
            pixels = images[i] if images is not None else np.full((size[1], size[0], 3), 20 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


# ------------------------------------------------------------------------ a real headless browser
def browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver); skips the test when one is missing, fails instead under
    XSVGGT_REQUIRE_BROWSER=1 (CI)."""
    import os
    import shutil

    import pytest

    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        msg = f"headless browser not found (chromium: {chromium}, chromedriver: {driver})"
        if os.environ.get("XSVGGT_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + " (XSVGGT_REQUIRE_BROWSER=1)")
        pytest.skip(msg)
    return chromium, driver


def open_browser(size=(800, 560)):
    """Headless Chromium (software WebGL) driven by selenium; quit() it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser_binaries()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={size[0]},{size[1]}",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    drv.set_page_load_timeout(30)
    return drv


def colour_pixels(png: bytes, rgb, tol: int = 40) -> int:
    """Pixels of a screenshot within `tol` (per channel) of the colour `rgb`."""
    import io

    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.int16)
    return int((np.abs(img - np.asarray(rgb, np.int16)) <= tol).all(-1).sum())


def render(browser, port: int, until=lambda png: False, settle: float = 20.0, load: bool = True) -> bytes:
    """Open the viser client (unless `load` is False: the page is open), wait (up to 30 s) for its
    WebGL canvas and its websocket connection, then screenshot until `until` holds or `settle` seconds
    pass; returns the last screenshot (PNG)."""
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if load:
        browser.get(f"http://127.0.0.1:{port}/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.TAG_NAME, "canvas")
                                     and "Connected" in d.find_element(By.TAG_NAME, "body").text)
    deadline = time.monotonic() + settle
    png = browser.get_screenshot_as_png()
    while not until(png) and time.monotonic() < deadline:
        time.sleep(0.5)
        png = browser.get_screenshot_as_png()
    return png


# ------------------------------------------------------------- torch.save files, written without torch

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class FakeGlobal:
    """An object that pickles as ``GLOBAL '<module> <name>'`` (see ``TorchPickler``)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle requires reduce targets to be callable
        raise AssertionError("fake global must never be called")


REBUILD_TENSOR = FakeGlobal("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = FakeGlobal("torch._utils", "_rebuild_parameter")


class FakeStorage:
    """A flat storage saved as data record ``key``."""

    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.shape = key, np.shape(data)
        self.data = np.ascontiguousarray(data).reshape(-1)


class FakeTensor:
    """Reduces like a torch tensor: ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(self, storage: FakeStorage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce_ex__(self, protocol: int) -> Any:
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return (REBUILD_TENSOR, args)


class FakeParameter:
    def __init__(self, tensor: FakeTensor) -> None:
        self.tensor = tensor

    def __reduce_ex__(self, protocol: int) -> Any:
        return (REBUILD_PARAMETER, (self.tensor, True, collections.OrderedDict()))


class FakeCall:
    """Pickles as a call ``module.name(*args)`` -- used for malicious payloads."""

    def __init__(self, module: str, name: str, *args: Any) -> None:
        self.target, self.args = FakeGlobal(module, name), args

    def __reduce_ex__(self, protocol: int) -> Any:
        return (self.target, self.args)


class TorchPickler(pickle._Pickler):  # pure-Python pickler so save() can be hooked
    """Emits GLOBAL opcodes for FakeGlobal and torch-style persistent ids for storages."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, FakeStorage):
            name = _STORAGE_NAMES[obj.data.dtype]
            return ("storage", FakeGlobal("torch", name), obj.key, "cpu", obj.data.size)
        return None

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, FakeGlobal):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)


def tensor(
    storage: FakeStorage, shape: tuple | None = None, offset: int = 0, stride: tuple | None = None
) -> FakeTensor:
    shape = storage.shape if shape is None else shape
    if stride is None:
        stride = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
    return FakeTensor(storage, offset, tuple(shape), tuple(stride))


def write_torch_zip(path: Path, obj: Any, archive: str = "archive", byteorder: bytes = b"little") -> Path:
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    storages: dict[str, FakeStorage] = {}

    def collect(o: Any) -> None:
        if isinstance(o, FakeTensor):
            storages[o.storage.key] = o.storage
        elif isinstance(o, FakeParameter):
            collect(o.tensor)
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)

    collect(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", buf.getvalue())
        if byteorder is not None:
            zf.writestr(f"{archive}/byteorder", byteorder)
        for key, st in storages.items():
            zf.writestr(f"{archive}/data/{key}", st.data.astype(st.data.dtype.newbyteorder("<")).tobytes())
        zf.writestr(f"{archive}/version", b"3\n")
    return path


def write_state_dict_pt(path: Path, arrays: dict) -> Path:
    """`arrays` ({name: np.ndarray}) saved as `torch.save(model.state_dict(), path)` lays them out (torch
    2.x), as VGGT ships `model.pt`: a zip whose top folder is the file's stem, records stored and their
    data 64-byte aligned (an "FB" padding field in each local header, torch's), `data.pkl` (pickle
    protocol 2) holding an OrderedDict whose `_metadata` attribute lists every module prefix, each
    tensor a `_rebuild_tensor_v2` of its own storage (`data/<i>`), then `.format_version`,
    `.storage_alignment`, `byteorder`, `version` and `.data/serialization_id`."""
    keys = list(arrays)
    prefixes = sorted({""} | {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)})

    class StateDict(collections.OrderedDict):
        def __reduce_ex__(self, protocol):  # as an OrderedDict with a `_metadata` attribute reduces
            meta = collections.OrderedDict((p, {"version": 1}) for p in prefixes)
            return FakeGlobal("collections", "OrderedDict"), (), {"_metadata": meta}, None, iter(self.items())

    storages = [FakeStorage(str(i), np.asarray(arrays[k])) for i, k in enumerate(keys)]
    state = StateDict((k, tensor(st)) for k, st in zip(keys, storages))
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state)
    top = Path(path).stem
    records = [("data.pkl", buf.getvalue()), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", b"little")]
    records += [(f"data/{st.key}", st.data.astype(st.data.dtype.newbyteorder("<")).tobytes())
                for st in storages]  # in key order, as torch writes them
    records += [("version", b"3\n"), (".data/serialization_id", b"1234567890123456789012345678901234567890")]
    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(f"{top}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            start = fh.tell() + 30 + len(info.filename.encode()) + 4  # where the data begins after "FB" + size
            pad = -start % 64
            info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
            zf.writestr(info, data)
    return Path(path)
