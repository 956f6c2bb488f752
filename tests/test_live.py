"""`xsvggt live` and the push API (`stream.session.StreamSession`), with the shipped demo model on
procedural scenes at its 84x112 training size. Every run here uses one cache configuration (CACHE), so
the step compiles once for the whole file (this process's jit cache, the run's compilation cache for
the subprocess).

No real camera exists on test machines: the camera path (`io.capture.AvCapture`, drop by default,
Ctrl-C) runs in a subprocess whose capture layer (`io.capture.open_av`, PyAV's V4L2 input) is replaced
by a fake camera that delivers a procedural scene at 50 frames/s. A missing camera goes through the
real layer.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from _refs import colour_pixels, open_browser, render, write_video
from conftest import run_error
from xsvggt_jax.app.cli import main
from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.io.frames import preprocess_image

ROOT = Path(__file__).resolve().parents[1]
HW = (84, 112)
SIZE = ["--size", "84x112"]
CACHE = ["--prune", "xstream", "--cache-size", "256"]  # pruning starts at frame 5 (53 tokens a frame)
CACHE_CFG = CacheConfig(prune="xstream", budget=256)


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """8 frames of the demo scene, uint8 [8, 168, 224, 3]: twice the model's size, so --size resizes."""
    from xsvggt_jax.data.procedural import make_demo_scene
    from xsvggt_jax.io.rgb import to_uint8_rgb

    return to_uint8_rgb(make_demo_scene(frames=8, height=168, width=224).images)


@pytest.fixture(scope="module")
def frames(scene) -> list[np.ndarray]:
    return [preprocess_image(Image.fromarray(img), "crop", HW) for img in scene]


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory) -> Path:
    """The shipped demo model as a params directory (what `--params` reads)."""
    from xsvggt_jax import pretrained
    from xsvggt_jax.weights.params import save_params

    params, cfg = pretrained.load("demo")
    return save_params(params, tmp_path_factory.mktemp("weights") / "demo", cfg)


@pytest.fixture(scope="module")
def session(params_dir):
    """A warmed-up session with the model as the CLI loads it (--params, --dtype auto)."""
    from xsvggt_jax.stream.session import StreamSession
    from xsvggt_jax.weights.loading import load_model

    params, cfg = load_model(argparse.Namespace(params=str(params_dir), checkpoint=None, spec=None, dtype="auto"))
    s = StreamSession(jax.device_put(params), cfg, CACHE_CFG, HW)
    s.warmup()
    return s


def _live(*argv) -> None:
    assert main(["live", *map(str, argv), "--no-view", "--quiet", *SIZE, *CACHE]) == 0


def _arrays(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------- push API
def test_session_pushes_from_threads_and_compiles_once(session, frames):
    """push returns the frame's outputs as device arrays; two capture threads may push at once (a lock:
    5 frames recorded, none lost); reset starts the same stream again; a second session of the same
    configuration shares the compiled step: one program for warmup, pushes, reset and both sessions."""
    from xsvggt_jax.stream.session import StreamSession

    session.reset()
    first = session.push(frames[0])
    assert isinstance(first["depth"], jax.Array) and first["depth"].shape == (*HW, 1)
    assert first["camera_pose"].shape == (9,) and "track" not in first
    errors = []

    def feed(batch):
        try:
            for f in batch:
                session.push(f)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=feed, args=(frames[i:i + 2],)) for i in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    result = session.result()
    assert session.frames == result.frames == 5 and len(result.latency_s) == 5
    assert result.predictions["depth"].shape == (5, *HW, 1) and result.rgb.shape == (5, *HW, 3)
    np.testing.assert_array_equal(result.predictions["depth"][0], np.asarray(first["depth"]))
    session.reset()
    again = session.push(frames[0])
    other = StreamSession(session.params, session.cfg, CACHE_CFG, HW, record=False)
    for out in (again, other.push(frames[0])):
        for k in first:
            np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(first[k]), err_msg=k)
    assert other._step is session._step and session._step.jitted._cache_size() == 1


def test_session_state_is_a_copy_that_orbax_saves_and_restores(session, frames, tmp_path):
    """`state` survives the next push (the step donates its own cache), saves with orbax
    (`io.state`), and a new session given it continues the stream bit for bit."""
    from xsvggt_jax.io.state import load_state, save_state
    from xsvggt_jax.stream.session import StreamSession

    session.reset()
    for f in frames[:2]:
        session.push(f)
    state = session.state
    expected = session.push(frames[2])  # donates the session's cache, not `state`
    save_state(tmp_path / "ckpt", state, {"frames_done": 2, "latency_s": [0.0] * 2, "cache_bytes": [0] * 2})
    resumed = StreamSession(session.params, session.cfg, CACHE_CFG, HW, record=False)
    resumed.state, _ = load_state(tmp_path / "ckpt", resumed.state)
    out = resumed.push(frames[2])
    for k in expected:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(expected[k]), err_msg=k)


# --------------------------------------------------------------------------------------- the command
def test_video_played_realtime_without_drops_is_what_reconstruct_writes(tmp_path, scene, params_dir):
    """`live VIDEO --realtime --no-drop --out A` writes what `reconstruct VIDEO --out B` writes, bit for bit
    (arrays, cloud, trajectory, depth maps, COLMAP), at --size 84x112 for both, plus live.json; the
    frames came at the video's 20 frames/s."""
    video = write_video(tmp_path / "walk.mp4", fps=20, images=scene[:6])
    _live(video, "--params", params_dir, "--realtime", "--no-drop", "--out", tmp_path / "live")
    assert main(["reconstruct", str(video), "--params", str(params_dir), "--quiet", "--out", str(tmp_path / "rec"),
                 *SIZE, *CACHE]) == 0
    live, rec = tmp_path / "live", tmp_path / "rec"
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files(live) == sorted([*files(rec), "live.json"])
    a, b = _arrays(live / "predictions.npz"), _arrays(rec / "predictions.npz")
    assert a.keys() == b.keys() and b["depth"].shape == (6, *HW, 1)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for rel in files(rec):
        if rel not in ("predictions.npz", "report.json", "stream.png", ".xsvggt-manifest.json"):
            assert (live / rel).read_bytes() == (rec / rel).read_bytes(), rel
    log = json.loads((live / "live.json").read_text())
    assert log["frames"] == 6 and log["dropped"] == 0 and not log["drop"] and log["stopped_by"] == "end of the source"
    assert log["per_frame"]["timestamp"] == b["timestamps"].tolist()
    received = log["per_frame"]["received_unix"]
    assert received[4] - received[0] > 4 / 20 - 0.01, received  # not faster than the video (the queue holds 4)


def test_a_source_faster_than_the_model_drops_frames_and_latency_stays_bounded(tmp_path, scene, params_dir, capsys):
    """A 200 frames/s video played in real time with --drop: the model takes the newest frame, every
    frame is processed or counted as dropped, and a frame waits at most for the step in progress."""
    video = write_video(tmp_path / "fast.mp4", fps=200, images=np.concatenate([scene] * 5))  # 40 frames, 0.2 s
    _live(video, "--params", params_dir, "--realtime", "--drop", "--out", tmp_path / "out")
    log = json.loads((tmp_path / "out" / "live.json").read_text())
    per = log["per_frame"]
    assert log["drop"] and log["dropped"] > 0 and log["frames"] + log["dropped"] == 40, log["dropped"]
    assert per["index"] == sorted(per["index"]) and per["index"][-1] == 39  # the last frame is never dropped
    assert max(per["latency_s"]) < 2 * max(per["step_s"]) + 0.25, (per["latency_s"], per["step_s"])
    assert f"{log['frames']} frames processed, {log['dropped']} dropped" in capsys.readouterr().err
    assert len(_arrays(tmp_path / "out" / "predictions.npz")["depth"]) == log["frames"]


def test_a_folder_that_receives_images_while_live_runs_is_reconstructed_in_order(tmp_path, scene, params_dir,
                                                                                  session):
    """Images written one by one into a watched folder (one of them slowly, in two halves) while live runs
    are taken in name order once complete: the predictions are those of the images pushed in that order."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    Image.fromarray(scene[0]).save(folder / "frame_00.png")

    def write() -> None:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".live.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.05)  # until live stages its outputs: the model is loaded, frames are taken
        for i in range(1, 4):
            time.sleep(0.3)
            data = _png_bytes(scene[i])
            if i == 2:  # a writer that pauses mid-file: the half image is not taken
                with open(folder / f"frame_{i:02d}.png", "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    time.sleep(0.4)
                    f.write(data[len(data) // 2:])
            else:
                (folder / f".frame_{i:02d}.tmp").write_bytes(data)
                os.replace(folder / f".frame_{i:02d}.tmp", folder / f"frame_{i:02d}.png")
    writer = threading.Thread(target=write)
    writer.start()
    try:
        _live(folder, "--params", params_dir, "--max-frames", "4", "--timeout", "30", "--out", tmp_path / "live")
    finally:
        writer.join()
    log = json.loads((tmp_path / "live" / "live.json").read_text())
    assert log["per_frame"]["name"] == [f"frame_{i:02d}.png" for i in range(4)] and log["stopped_by"] == "--max-frames"
    a = _arrays(tmp_path / "live" / "predictions.npz")
    session.reset()
    for i in range(4):
        with Image.open(folder / f"frame_{i:02d}.png") as img:
            out = session.push(preprocess_image(img, "crop", HW))
        for k in ("depth", "depth_conf", "pts3d_in_other_view", "conf", "camera_pose"):
            np.testing.assert_array_equal(a[k][i], np.asarray(out[k]), err_msg=f"{k} frame {i}")
    assert np.all(np.diff(a["timestamps"]) > 0.2)  # the images' modification times (s after the first's)


def test_a_watched_folder_takes_images_once_complete(tmp_path, scene):
    """The folder source alone (no model): an image written in two halves 0.5 s apart is taken once
    complete (it decodes when the loop gets it), then the next in name order; nothing new for the
    timeout ends the source."""
    from xsvggt_jax.io.capture import FolderCapture, prepare

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(scene[0]).save(folder / "a_00.png")
    capture = FolderCapture(folder, timeout=1.5)
    got, errors = [], []

    def consume() -> None:
        try:
            for item in capture.frames():
                prepare(item, "crop", HW)  # as the live loop does when it takes the frame
                got.append(item.name)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    reader = threading.Thread(target=consume)
    reader.start()
    data = _png_bytes(scene[1])
    with open(folder / "a_01.png", "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.5)
        f.write(data[len(data) // 2:])
    (folder / ".a_02.tmp").write_bytes(_png_bytes(scene[2]))
    os.replace(folder / ".a_02.tmp", folder / "a_02.png")
    reader.join(timeout=30)
    assert not reader.is_alive() and not errors and got == ["a_00.png", "a_01.png", "a_02.png"], (got, errors)


def test_size_reaches_reconstruct_many_scenes(tmp_path, scene, params_dir, monkeypatch, capsys):
    """`reconstruct-many --size HxW` opens every scene at that size (its plan; the pools do not run
    here); a size that is not in whole patches is one error line."""
    from xsvggt_jax import many
    from xsvggt_jax.many.run import plan

    planned = []

    def run_many(scenes, root, cfg, cache_cfg, params, options, **kw):
        planned.append(plan(scenes, root, cfg, options))
        return {"failed": 0, "scenes": []}
    monkeypatch.setattr(many, "run_many", run_many)
    video = write_video(tmp_path / "v.mp4", fps=20, images=scene[:2])
    assert main(["reconstruct-many", str(video), "--params", str(params_dir), "--out", str(tmp_path / "root"),
                 *SIZE]) == 0
    (jobs, failed), = planned
    assert not failed and (jobs[0].source.height, jobs[0].source.width) == HW
    err = run_error(["reconstruct", str(video), "--params", "p", "--out", str(tmp_path / "out"), "--size", "84x100"],
                    capsys)
    assert "--size: expected a frame size HxW, multiples of 14" in err, err


def _png_bytes(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_sources_are_one_error_line_and_write_nothing(tmp_path, capsys):
    """A camera that does not exist, a stream that does not answer (1 s timeout), a folder that gets no
    image: one error line, exit 2, no OUTDIR, before any model work; bad flag combinations too."""
    out = tmp_path / "out"
    folder = tmp_path / "empty"
    folder.mkdir()
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(1)  # connections are queued, never answered
    url = f"http://127.0.0.1:{mute.getsockname()[1]}/live.mjpeg"
    cases = [(["/dev/video99"], "camera /dev/video99: no such device"),
             ([url, "--timeout", "1"], f"{url}: cannot open it within 1 s"),
             ([str(folder), "--timeout", "0.3"], "no image (.jpeg, .jpg, .png, .webp) arrived within 0.3 s"),
             ([str(folder), "--realtime"], "--realtime paces a video file"),
             (["walk.mp4", "--prune", "none"], "--prune none keeps every frame"),
             (["ftp://host/x"], "unsupported stream type ftp://")]
    try:
        for argv, message in cases:
            start = time.monotonic()
            err = run_error(["live", *argv, "--out", str(out)], capsys)
            assert message in err, (argv, err)
            assert time.monotonic() - start < 20 and not out.exists(), argv
    finally:
        mute.close()


# ------------------------------------------------------------------------------------------ viewer
def _drawn(png: bytes, blank: bytes, width_share: float = 0.6) -> np.ndarray:
    """[H, W'] bool: pixels of the 3D view (the window's left part, clear of viser's panel) that differ
    from the empty scene's."""
    import io

    a, b = (np.asarray(Image.open(io.BytesIO(p)).convert("RGB"), np.int16) for p in (png, blank))
    cols = int(a.shape[1] * width_share)
    return np.abs(a[:, :cols] - b[:, :cols]).max(-1) > 40


def test_viewer_in_a_browser_shows_more_points_as_frames_stream(session, frames):
    """A real Chromium on the live viewer while frames stream: after 1 frame some points are drawn,
    after 6 frames many more, and the first frame's are still there (the scene grows; cameras hidden,
    so only points count); the panel shows the stream."""
    import viser
    from selenium.webdriver.common.by import By

    from xsvggt_jax.app.live_view import LiveStats, LiveViewer
    from xsvggt_jax.io.rgb import to_uint8_rgb

    server = viser.ViserServer(host="127.0.0.1", port=0, verbose=False)
    browser = open_browser((1000, 640))
    try:
        viewer = LiveViewer(server, points_per_frame=3000)
        viewer.show_cameras(False)
        blank = render(browser, server.get_port(), settle=0.0)
        for button in browser.find_elements(By.CSS_SELECTOR, "button.mantine-Notification-closeButton"):
            button.click()  # "software WebGL" notice
        blank = render(browser, 0, load=False, settle=0.5)
        session.reset()

        done = []

        def push(i: int) -> None:
            start = time.perf_counter()
            out = jax.device_get(session.push(frames[i]))
            done.append(time.perf_counter())
            viewer.add_frame(i, out["depth"], out["depth_conf"], out["camera_pose"], to_uint8_rgb(frames[i]))
            fps = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 else 0.0
            viewer.update_stats(LiveStats(frames=i + 1, fps=fps, latency_s=done[-1] - start, step_s=done[-1] - start,
                                          cache_bytes=session.cache_bytes, filled_bytes=session.filled_bytes,
                                          status="live: procedural room"))
        push(0)
        early = _drawn(render(browser, 0, load=False, until=lambda p: _drawn(p, blank).sum() > 1000), blank)
        for i in range(1, 6):
            push(i)
        late = _drawn(render(browser, 0, load=False, until=lambda p: _drawn(p, blank).sum() > 2 * early.sum()), blank)
        viewer.show_cameras(True)
        shot = render(browser, 0, load=False, settle=2.0)
        panel = browser.find_element(By.TAG_NAME, "body").text
    finally:
        browser.quit()
        server.stop()
    if os.environ.get("XSVGGT_LIVE_SCREENSHOT"):  # the README's picture: XSVGGT_LIVE_SCREENSHOT=docs/live.png
        Path(os.environ["XSVGGT_LIVE_SCREENSHOT"]).write_bytes(shot)
    assert viewer.points_drawn > 5 * 1000 and len(viewer.frustums) == 6
    kept = (early & late).sum() / early.sum()
    assert early.sum() > 1000 and late.sum() > 2 * early.sum() and kept > 0.9, (early.sum(), late.sum(), kept)
    assert colour_pixels(shot, (240, 143, 31), tol=25) > 100  # the orange trajectory (as rendered), cameras shown
    assert "live: procedural room" in panel and "frames/s" in panel, panel


# ------------------------------------------------------------------------------ camera (fake layer)
FAKE_CAMERA = """
import sys, time
import numpy as np
from xsvggt_jax.io import capture

scene = np.load(sys.argv[1])["images"]

class Frame:
    def __init__(self, pixels, t):
        self.pixels, self.time, self.height, self.width = pixels, t, *pixels.shape[:2]
    def to_ndarray(self, format):
        assert format == "rgb24"
        return self.pixels

class Camera:  # what PyAV's v4l2 input gives: video streams, decode(), close()
    class streams:
        video = [object()]
    def decode(self, video=0):
        start = time.monotonic()
        for i in range(10 ** 9):
            time.sleep(max(0.0, start + i / 50 - time.monotonic()))  # 50 frames/s
            yield Frame(scene[i % len(scene)], 1000.0 + i / 50)
    def close(self):
        pass

def open_av(url, fmt, timeout):
    assert (url, fmt) == ("/dev/video0", "v4l2"), (url, fmt)
    return Camera()
capture.open_av = open_av
from xsvggt_jax.app.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_camera_through_a_fake_capture_layer_streams_until_ctrl_c(tmp_path, scene):
    """`xsvggt live 0` (the shipped demo model by default, at its 84x112): the viewer answers, frames
    are dropped by default, Ctrl-C stops the run cleanly (exit 0) and OUTDIR holds the frames processed."""
    import urllib.request

    np.savez(tmp_path / "scene.npz", images=scene)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", FAKE_CAMERA, str(tmp_path / "scene.npz"), "live", "0", "--port", "0",
                             "--quiet", "--out", str(out), *CACHE], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if " at http://127.0.0.1:" in line:
                url = line.split(" at ")[1].split()[0]
                with urllib.request.urlopen(url, timeout=10) as r:
                    assert r.status == 200
            if "model ready" in line:
                break
        assert lines and "model ready" in lines[-1], lines
        time.sleep(1.5)
        interrupted = time.time()
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(lines) + rest
    assert proc.returncode == 0 and stdout.strip() == str(out), err
    assert "Traceback" not in err and "stopped: signal" in err, err
    log = json.loads((out / "live.json").read_text())
    per = log["per_frame"]
    assert log["kind"] == "camera" and log["drop"] and log["frames"] >= 1 and log["stopped_by"] == "signal"
    assert per["name"] == [f"frame_{i:06d}.jpg" for i in per["index"]] and per["index"] == sorted(per["index"])
    # seconds since the source's first frame by the camera's own clock (1000 + i / 50), also when frame 0
    # was dropped (--drop is the default: the first frame processed may be a later one)
    np.testing.assert_allclose(per["timestamp"], np.asarray(per["index"]) / 50, atol=1e-6)
    assert max(per["received_unix"]) < interrupted + 1.0  # Ctrl-C stops taking frames at once
    depth = _arrays(out / "predictions.npz")["depth"]
    assert depth.shape == (log["frames"], *HW, 1)
    assert len(list((out / "colmap" / "images").iterdir())) == log["frames"]
    assert "demo" in json.loads((out / "report.json").read_text())["note"]
