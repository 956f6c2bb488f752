"""Tests for xsvggt_jax.weights.torch_reader (no torch: fixtures are hand-built)."""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from _refs import FakeCall, FakeParameter, FakeStorage, TorchPickler, tensor, write_torch_zip
from xsvggt_jax.weights.torch_reader import CheckpointError, read_state_dict

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "tiny"

# ---------------------------------------------------------------------------
# torch zip format
# ---------------------------------------------------------------------------


def test_round_trip_dtypes_strides_offsets_shared(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 4)).astype(np.float32)
    f16 = rng.standard_normal(5).astype(np.float16)
    i64 = np.arange(-6, 6, dtype=np.int64).reshape(2, 2, 3)
    bf16 = rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
    shared = np.arange(20, dtype=np.float32)
    s_f32, s_shared = FakeStorage("0", f32), FakeStorage("4", shared)
    sd = collections.OrderedDict(
        [
            ("w", tensor(s_f32)),
            ("w_t", tensor(s_f32, shape=(4, 3), stride=(1, 4))),  # transposed view
            ("h", tensor(FakeStorage("1", f16))),
            ("idx", tensor(FakeStorage("2", i64))),
            ("bf", FakeParameter(tensor(FakeStorage("3", bf16)))),
            ("a", tensor(s_shared, shape=(2, 3), offset=2)),  # nonzero offset
            ("b", tensor(s_shared, shape=(3, 2), offset=10, stride=(1, 3))),  # same storage
            ("scalar", tensor(FakeStorage("5", np.array([7], dtype=np.int64)), shape=())),
        ]
    )
    out = read_state_dict(write_torch_zip(tmp_path / "m.pth", sd))

    expected = {
        "w": f32,
        "w_t": f32.T,
        "h": f16,
        "idx": i64,
        "bf": bf16,
        "a": shared[2:8].reshape(2, 3),
        "b": shared[10:16].reshape(2, 3).T,
        "scalar": np.array(7, dtype=np.int64),
    }
    assert list(out) == list(expected)
    for k, ref in expected.items():
        assert out[k].dtype == ref.dtype, k
        assert out[k].shape == ref.shape, k
        assert out[k].flags["C_CONTIGUOUS"], k
        np.testing.assert_array_equal(out[k], ref, err_msg=k)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapper_and_module_prefix(tmp_path: Path, wrapper: str) -> None:
    data = np.ones((2, 2), np.float32)
    inner = {"module.x": tensor(FakeStorage("0", data)), "module.y.z": tensor(FakeStorage("1", data * 2))}
    for top in ({wrapper: inner}, {wrapper: inner, "epoch": 3, "optimizer": {"lr": 0.1}}):
        out = read_state_dict(write_torch_zip(tmp_path / f"{wrapper}.pt", top, archive="any_name"))
        assert sorted(out) == ["x", "y.z"]
        np.testing.assert_array_equal(out["y.z"], data * 2)


def test_partial_module_prefix_kept(tmp_path: Path) -> None:
    st = FakeStorage("0", np.zeros(2, np.float32))
    out = read_state_dict(write_torch_zip(tmp_path / "p.bin", {"module.a": tensor(st), "b": tensor(st)}))
    assert sorted(out) == ["b", "module.a"]


def test_non_array_inside_state_dict_is_error(tmp_path: Path) -> None:
    sd = {"w": tensor(FakeStorage("0", np.zeros(2, np.float32))), "num_steps": 5}
    with pytest.raises(CheckpointError, match="num_steps"):
        read_state_dict(write_torch_zip(tmp_path / "bad.pth", sd))


def test_truncated_zip(tmp_path: Path) -> None:
    path = write_torch_zip(tmp_path / "t.pth", {"w": tensor(FakeStorage("0", np.zeros(64, np.float32)))})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="t.pth"):
        read_state_dict(path)


def test_storage_too_short_and_missing_record(tmp_path: Path) -> None:
    st = FakeStorage("0", np.zeros(4, np.float32))
    path = write_torch_zip(tmp_path / "s.pth", {"w": tensor(st, shape=(4,), offset=2)})
    with pytest.raises(CheckpointError, match="too short"):
        read_state_dict(path)
    with zipfile.ZipFile(path) as zf:
        pkl = zf.read("archive/data.pkl")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
    with pytest.raises(CheckpointError, match="missing data record"):
        read_state_dict(path)


def test_big_endian_refused(tmp_path: Path) -> None:
    path = write_torch_zip(tmp_path / "be.pth", {"w": tensor(FakeStorage("0", np.zeros(2, np.float32)))}, byteorder=b"big")
    with pytest.raises(CheckpointError, match="little-endian"):
        read_state_dict(path)


def test_os_system_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"w": FakeCall("os", "system", f"touch {marker}")}
    path = write_torch_zip(tmp_path / "evil.pth", payload)
    with pytest.raises(CheckpointError, match=r"os\.system") as info:
        read_state_dict(path)
    assert "evil.pth" in str(info.value)
    assert not marker.exists()


def test_zero_stride_tensor_claiming_terabytes_is_refused(tmp_path: Path) -> None:
    """A 4-byte storage viewed with stride 0 as 1.46 TiB of float32: refused by name, never allocated."""
    numel = 400_000_000_000  # x 4 bytes = 1.46 TiB
    st = FakeStorage("0", np.ones(1, np.float32))
    sd = {"ok": tensor(FakeStorage("1", np.ones(3, np.float32))), "huge": tensor(st, shape=(numel,), stride=(0,))}
    path = write_torch_zip(tmp_path / "bomb.pth", sd)
    assert path.stat().st_size < 2000
    with pytest.raises(CheckpointError, match=r"tensor 'huge' claims 400000000000 elements \(1\.46 TiB\)"):
        read_state_dict(path)


def test_broadcast_rows_are_refused_but_views_of_a_larger_storage_pass(tmp_path: Path) -> None:
    st = FakeStorage("0", np.arange(6, dtype=np.float32))
    bad = write_torch_zip(tmp_path / "rows.pth", {"rows": tensor(st, shape=(4, 6), stride=(0, 1))})
    with pytest.raises(CheckpointError, match="tensor 'rows' claims 24 elements"):
        read_state_dict(bad)
    good = write_torch_zip(tmp_path / "view.pth", {"col": tensor(st, shape=(3,), offset=1, stride=(2,))})
    np.testing.assert_array_equal(read_state_dict(good)["col"], [1, 3, 5])


def test_total_beyond_memory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xsvggt_jax.weights import torch_reader as checkpoint_reader
    st = FakeStorage("0", np.zeros(64, np.float32))  # 256 B storage; a, b, c view all of it: 1 KiB in all
    path = write_torch_zip(tmp_path / "shared.pth", {k: tensor(st) for k in "abc"})
    monkeypatch.setattr(checkpoint_reader, "_memory_bytes", lambda: 1000)
    with pytest.raises(CheckpointError, match="loading needs 1.0 KiB, more than"):
        read_state_dict(path)
    monkeypatch.setattr(checkpoint_reader, "_memory_bytes", lambda: 1024)
    assert sorted(read_state_dict(path)) == ["a", "b", "c"]


def test_storage_numel_beyond_record_is_refused_before_reading(tmp_path: Path) -> None:
    """The persistent id claims more elements than the record holds (e.g. a 10**12-element storage)."""

    class BigStoragePickler(TorchPickler):
        def persistent_id(self, obj: Any) -> Any:
            pid = super().persistent_id(obj)
            return None if pid is None else pid[:4] + (10**12,)

    st = FakeStorage("0", np.zeros(2, np.float32))
    buf = io.BytesIO()
    BigStoragePickler(buf, protocol=2).dump({"w": tensor(st)})
    path = tmp_path / "big.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", st.data.tobytes())
    with pytest.raises(CheckpointError, match="has 8 bytes, expected 4000000000000"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "module,name",
    [("builtins", "eval"), ("__builtin__", "getattr"), ("numpy.core.multiarray", "_reconstruct"), ("torch", "load")],
)
def test_forbidden_globals(tmp_path: Path, module: str, name: str) -> None:
    path = write_torch_zip(tmp_path / "evil.pth", {"w": FakeCall(module, name, "1")})
    with pytest.raises(CheckpointError, match=f"forbidden global '{module}.{name}'"):
        read_state_dict(path)


def test_missing_legacy_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
    with pytest.raises(CheckpointError, match="legacy torch format"):
        read_state_dict(legacy)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a recognised checkpoint"):
        read_state_dict(junk)
    other_zip = tmp_path / "other.pth"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_state_dict(other_zip)


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------


def test_safetensors_round_trip_and_truncation(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    tensors = {
        "module.a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "module.b": np.arange(5, dtype=np.int64),
        "module.c": np.ones((2, 2), np.float16),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    out = read_state_dict(path)
    assert sorted(out) == ["a", "b", "c"]
    for k, v in tensors.items():
        assert out[k[len("module.") :]].dtype == v.dtype
        np.testing.assert_array_equal(out[k[len("module.") :]], v)

    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="w.safetensors"):
        read_state_dict(path)


# ---------------------------------------------------------------------------
# Real torch.save reference
# ---------------------------------------------------------------------------


def test_reference_pth_matches_safetensors() -> None:
    pth, sft = REFERENCE_DIR / "weights.pth", REFERENCE_DIR / "weights.safetensors"
    if not (pth.is_file() and sft.is_file()):
        reason = f"reference checkpoints not found under {REFERENCE_DIR}"
        if os.environ.get("XSVGGT_REQUIRE_REFERENCE") == "1":
            pytest.fail(reason + " (XSVGGT_REQUIRE_REFERENCE=1)")
        pytest.skip(reason)
    a, b = read_state_dict(pth), read_state_dict(sft)
    assert a and set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
