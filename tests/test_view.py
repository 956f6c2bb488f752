"""`xsvggt view`: reading an OUTDIR, the scene it builds, its errors, and a real headless browser
that renders the scene (Chromium + chromedriver, software WebGL).

The browser test skips only when Chromium or chromedriver cannot be found and
XSVGGT_REQUIRE_BROWSER is unset; CI sets XSVGGT_REQUIRE_BROWSER=1 (and installs Chromium) so a
missing browser fails there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import viser

from _refs import colour_pixels, open_browser, render as _render
from conftest import run_error
from xsvggt_jax import geometry as G
from xsvggt_jax.io import exports as ex
from xsvggt_jax.app.view import ViewError, build_scene, frame_colours, load_result

S, H, W = 5, 24, 32
POINT_RGB = (255, 0, 255)  # magenta: no part of viser's page is drawn in it
ROOT = Path(__file__).resolve().parents[1]
MIN_POINT_PIXELS = 2000  # the cloud has S*H*W = 3840 points of a few pixels each


def write_outdir(out: Path, points_rgb=POINT_RGB) -> Path:
    """A tiny OUTDIR in reconstruct's format: cameras on an arc looking at a wavy wall 3 units
    ahead, predictions.npz (as io.scene.write_scene writes it) and points.ply (unprojected depth)."""
    out.mkdir(parents=True, exist_ok=True)
    yaw = np.linspace(-0.25, 0.25, S)
    quat = np.stack([np.zeros(S), np.sin(yaw / 2), np.zeros(S), np.cos(yaw / 2)], -1)  # xyzw about y
    pose = np.concatenate([np.stack([np.linspace(-0.8, 0.8, S), np.zeros(S), np.zeros(S)], -1), quat,
                           np.full((S, 2), 1.2)], -1).astype(np.float32)  # [S,9] t, q, fov h, w
    extr, intr = G.pose_encoding_to_extri_intri(pose, (H, W))
    yy, xx = np.mgrid[0:H, 0:W]
    depth = (3.0 + 0.2 * np.sin(xx / 3.0) * np.cos(yy / 4.0))[None, :, :, None].repeat(S, 0)  # [S,H,W,1]
    conf = np.broadcast_to(1.0 + xx / W, (S, H, W)).astype(np.float32)  # rises to the right
    pts = G.unproject_depth(depth, extr, intr)
    colours = np.broadcast_to(np.asarray(points_rgb, np.uint8), (S, H, W, 3))
    xyz, rgb = ex.select_points(pts, conf, colours, 0.0)
    ex.write_ply(out / "points.ply", xyz, rgb)
    np.savez(out / "predictions.npz", depth=depth.astype(np.float32), depth_conf=conf,
             pts3d_in_other_view=pts, conf=conf, camera_pose=pose,
             extrinsics=extr.astype(np.float32), intrinsics=intr.astype(np.float32))
    return out


@pytest.fixture()
def outdir(tmp_path) -> Path:
    return write_outdir(tmp_path / "out")


@pytest.fixture()
def server():
    srv = viser.ViserServer(host="127.0.0.1", port=0, verbose=False)
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------- reading / the scene


def test_load_result_reads_cameras_and_the_ply(outdir):
    res = load_result(outdir)
    assert res.hw == (H, W)
    assert res.extrinsics.shape == (S, 3, 4) and res.intrinsics.shape == (S, 3, 3)
    assert len(res.cloud.xyz) == S * H * W and res.cloud.conf is None
    assert (res.cloud.rgb == POINT_RGB).all()
    assert len(load_result(outdir, max_points=100).cloud.xyz) == 100


def test_build_scene_adds_a_frustum_per_frame_at_the_camera_centres(outdir, server):
    scene = build_scene(server, outdir, max_points=1000)
    assert scene.frustum_frames == list(range(S)) and len(scene.frustums) == S
    centres = G.invert_extrinsics(load_result(outdir).extrinsics)[:, :, 3]
    np.testing.assert_allclose([f.position for f in scene.frustums], centres, atol=1e-5)
    assert scene.points.points.shape == (1000, 3)
    segments = np.asarray(scene.trajectory.points)  # [S-1, 2, 3]
    np.testing.assert_allclose(segments[:, 0], centres[:-1], atol=1e-5)
    np.testing.assert_allclose(segments[:, 1], centres[1:], atol=1e-5)


def test_conf_percentile_draws_the_confident_depth_points_coloured_by_frame(outdir, server):
    scene = build_scene(server, outdir, conf_percentile=50.0)
    conf = load_result(outdir, conf_percentile=50.0).cloud.conf
    shown = len(scene.points.points)
    assert shown == int((conf >= np.percentile(conf, 50.0)).sum())
    assert 0.4 * S * H * W < shown < 0.6 * S * H * W  # conf rises across the columns
    palette = {tuple(c) for c in frame_colours(S)}
    assert {tuple(c) for c in scene.points.colors} == palette


def test_show_hides_later_frames_and_rethresholds(outdir, server):
    """What the frame and confidence sliders call."""
    scene = build_scene(server, outdir, conf_percentile=0.0)
    cloud = scene.result.cloud
    assert len(scene.points.points) == S * H * W
    scene.show(1, 50.0)
    keep = (cloud.frame <= 1) & (cloud.conf >= np.percentile(cloud.conf, 50.0))
    np.testing.assert_array_equal(scene.points.points, cloud.xyz[keep])
    assert [f.visible for f in scene.frustums] == [True, True, False, False, False]
    assert len(scene.trajectory.points) == len(scene.trajectory.colors) == 1 and scene.trajectory.visible
    scene.show(0)  # the threshold stays
    assert len(scene.points.points) == int(((cloud.frame == 0) & (cloud.conf >= scene.conf_threshold)).sum())
    assert not scene.trajectory.visible


def test_ply_cloud_stays_with_the_frame_slider(outdir, server):
    scene = build_scene(server, outdir)
    scene.show(0)
    assert len(scene.points.points) == S * H * W  # points.ply has no frame index
    assert [f.visible for f in scene.frustums] == [True, False, False, False, False]


def test_nothing_finite_is_one_error_line(outdir, capsys):
    with np.load(outdir / "predictions.npz") as z:
        arrays = dict(z)
    arrays["extrinsics"][:] = np.nan
    np.savez(outdir / "predictions.npz", **arrays)
    ex.write_ply(outdir / "points.ply", np.full((4, 3), np.nan, np.float32), np.zeros((4, 3), np.uint8))
    assert "nothing to show" in run_error(["view", str(outdir), "--port", "0"], capsys)


def test_points_without_cameras_are_looked_at(outdir, server):
    """An untrained model predicts a zero field of view (infinite focal): points, no frustums."""
    with np.load(outdir / "predictions.npz") as z:
        arrays = dict(z)
    arrays["intrinsics"][:, 1, 1] = np.inf
    np.savez(outdir / "predictions.npz", **arrays)
    scene = build_scene(server, outdir)
    assert scene.frustums == [] and scene.trajectory is None
    assert len(scene.points.points) == S * H * W
    xyz = scene.result.cloud.xyz
    assert ((server.initial_camera.look_at >= xyz.min(0)) & (server.initial_camera.look_at <= xyz.max(0))).all()
    with pytest.raises(ViewError, match="without --conf-percentile, points.ply is shown"):
        load_result(outdir, conf_percentile=50.0)


def test_non_finite_cameras_are_skipped(outdir, server):
    with np.load(outdir / "predictions.npz") as z:
        arrays = dict(z)
    arrays["extrinsics"][2] = np.nan
    np.savez(outdir / "predictions.npz", **arrays)
    scene = build_scene(server, outdir)
    assert scene.frustum_frames == [0, 1, 3, 4]


@pytest.mark.parametrize("damage, message", [
    ("missing", "nowhere: not a directory"),
    ("empty", "no predictions.npz"),
    ("truncated", "unreadable"),
    ("no_extrinsics", "no 'extrinsics'"),
    ("no_ply", "no points.ply"),
    ("bad_ply", "points.ply: unreadable"),
])
def test_bad_outdir_is_one_error_line(tmp_path, outdir, capsys, damage, message):
    target = outdir
    if damage == "missing":
        target = tmp_path / "nowhere"
    elif damage == "empty":
        target = tmp_path / "empty"
        target.mkdir()
    elif damage == "truncated":
        data = (outdir / "predictions.npz").read_bytes()
        (outdir / "predictions.npz").write_bytes(data[: len(data) // 2])
    elif damage == "no_extrinsics":
        with np.load(outdir / "predictions.npz") as z:
            arrays = {k: z[k] for k in z.files if k != "extrinsics"}
        np.savez(outdir / "predictions.npz", **arrays)
    elif damage == "no_ply":
        (outdir / "points.ply").unlink()
    elif damage == "bad_ply":
        data = (outdir / "points.ply").read_bytes()
        (outdir / "points.ply").write_bytes(data[:300])
    err = run_error(["view", str(target), "--port", "0"], capsys)
    assert message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--max-points", "0"], "--max-points must be positive"),
    (["--conf-percentile", "101"], "--conf-percentile must be in [0, 100]"),
    (["--port", "70000"], "--port must be in 0..65535"),
])
def test_bad_options_are_one_error_line(outdir, capsys, argv, message):
    assert message in run_error(["view", str(outdir), *argv], capsys)


def test_cli_serves_until_sigterm(outdir):
    """`xsvggt view` binds loopback, answers HTTP, and exits 0 on SIGTERM."""
    import urllib.request

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "xsvggt_jax.app.cli", "view", str(outdir), "--port", "0"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "http://127.0.0.1:" in line, line
        url = line.split()[line.split().index("at") + 1]
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------- headless browser


@pytest.fixture(scope="module")
def browser():
    drv = open_browser()
    yield drv
    drv.quit()


def _point_pixels(png: bytes, rgb=POINT_RGB, tol: int = 40) -> int:
    """Pixels of a screenshot within `tol` (per channel) of the points' colour."""
    return colour_pixels(png, rgb, tol)


def test_browser_draws_the_points_and_cameras(outdir, browser):
    """A real Chromium renders the scene: many point-coloured pixels and the first frustum's
    colour, neither of which an empty scene shows."""
    empty = viser.ViserServer(host="127.0.0.1", port=0, verbose=False)
    try:
        blank = _render(browser, empty.get_port(), settle=0.0)  # connected: nothing more to wait for
    finally:
        empty.stop()
    srv = viser.ViserServer(host="127.0.0.1", port=0, verbose=False)
    try:
        build_scene(srv, outdir)
        png = _render(browser, srv.get_port(), until=lambda p: _point_pixels(p) > MIN_POINT_PIXELS)
    finally:
        srv.stop()
    if os.environ.get("XSVGGT_VIEW_SCREENSHOT"):  # to look at it: XSVGGT_VIEW_SCREENSHOT=file.png
        Path(os.environ["XSVGGT_VIEW_SCREENSHOT"]).write_bytes(png)
    drawn, background = _point_pixels(png), _point_pixels(blank)
    assert background < 50, background
    assert drawn > MIN_POINT_PIXELS, f"{drawn} point-coloured pixels (empty scene: {background})"
    first_camera = tuple(int(c) for c in frame_colours(S)[0])
    assert _point_pixels(blank, first_camera) < 20
    assert _point_pixels(png, first_camera) > 50


# ------------------------------------------------------------------------------- issue 22: addresses, empty clouds
VIEW_DRIVER = """
import ipaddress, socket, sys
real = socket.getaddrinfo

def getaddrinfo(host, *a, **k):  # no DNS query leaves the test: only addresses and localhost resolve
    name = host.decode() if isinstance(host, bytes) else host
    try:
        ipaddress.ip_address(name or "")
    except ValueError:
        if name not in (None, "", "localhost"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return real(host, *a, **k)
socket.getaddrinfo = getaddrinfo
from xsvggt_jax.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_unbindable_host_is_one_error_line_within_seconds(outdir):
    """An address this machine cannot listen on (another machine's, not an address, a name that does
    not resolve, the empty string, which used to mean every interface) ends in one error line: no
    hang, no thread traceback, nothing served. Only bind attempts: no traffic leaves the machine."""
    hosts = ["8.8.8.8", "256.1.1.1", "bogus.invalid", ""]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", VIEW_DRIVER, "view", str(outdir), "--host", host, "--port", "0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for host in hosts]
    try:
        for host, proc in zip(hosts, procs):
            try:
                out, err = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"--host {host!r}: still running after 90 s; stderr: {err[-1000:]}")
            lines = err.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("xsvggt: error: --host"), \
                (host, proc.returncode, err[-2000:])
            assert "http" not in err and out == "", (host, err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_only_a_wildcard_address_exposes_the_server_and_warns(caplog):
    """0.0.0.0 (and :: where this machine has IPv6) listen on every interface, with a warning, and the
    URL announced is one a browser on this machine opens; loopback addresses and names do not warn."""
    import logging
    import socket

    from xsvggt_jax.app.listen import listen_address

    with caplog.at_level(logging.WARNING):
        assert listen_address("127.0.0.1") == "127.0.0.1"
        assert listen_address("localhost") == "localhost"
        assert not caplog.records
        assert listen_address("0.0.0.0") == "127.0.0.1"
    assert len(caplog.records) == 1 and "every" in caplog.records[0].getMessage()
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
        except OSError:
            return
        assert listen_address("::1") == "[::1]"
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert listen_address("::") == "[::1]"
        assert len(caplog.records) == 1 and "every" in caplog.records[0].getMessage()


@pytest.mark.parametrize("conf_percentile", [None, 50.0])
def test_all_nan_depth_warns_that_no_point_is_drawn(outdir, server, caplog, conf_percentile):
    """All-NaN depth (so a points.ply of NaN points): the cameras are still drawn, with a warning that
    there is no point to draw; with nothing at all to draw it is an error
    (test_nothing_finite_is_one_error_line)."""
    import logging

    with np.load(outdir / "predictions.npz") as z:
        arrays = dict(z)
    arrays["depth"][:] = np.nan
    np.savez(outdir / "predictions.npz", **arrays)
    ex.write_ply(outdir / "points.ply", np.full((4, 3), np.nan, np.float32), np.zeros((4, 3), np.uint8))
    with caplog.at_level(logging.WARNING):
        scene = build_scene(server, outdir, conf_percentile=conf_percentile)
    assert len(scene.points.points) == 0 and len(scene.frustums) == S
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no finite point" in m for m in warned), warned


def test_sigterm_on_view_does_not_claim_removed_outputs(tmp_path, monkeypatch, capsys):
    """`view` writes nothing: SIGTERM's line says the viewer stopped, not that outputs were removed."""
    import signal

    from xsvggt_jax.app import cli
    from xsvggt_jax.runtime import Terminated

    def terminated(args):
        raise Terminated(signal.SIGTERM)
    monkeypatch.setattr(cli, "_view", terminated)
    with pytest.raises(SystemExit) as e:
        cli.main(["view", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 128 + signal.SIGTERM and "the viewer stopped" in err and "removed" not in err
