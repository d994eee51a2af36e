"""flowmc.io.ensemble: HDF5 round trips, resume, bad files, read-only access, SIGKILL safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import flowmc.io.ensemble as fe
from flowmc.io.ensemble import (
    SCHEMA_VERSION,
    Ensemble,
    EnsembleWriter,
    file_sha256,
    open_ensemble,
)

L = (4, 3)
C = 2
ACTION = {"m2": -4.0, "lam": 8.0}
SAMPLER = {"name": "imh", "chunk": 3}
SHA = "ab" * 32
IMH_SCALARS = ["action", "log_q", "log_weight", "accepted", "magnetization"]


def _create(path: Path, **kw: object) -> EnsembleWriter:
    args = dict(
        lattice_shape=L,
        n_chains=C,
        scalar_names=IMH_SCALARS,
        action=ACTION,
        sampler=SAMPLER,
        model_sha256=SHA,
        seed=1234,
        meta={"note": "test", "config": {"beta": [1, 2]}},
        chunk_size=4,
        command_line="flowmc sample --test",
    )
    args.update(kw)
    return EnsembleWriter.create(path, **args)


def _rows(start: int, k: int, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """k rows; configs carry their own row index in element [0, 0] and random values elsewhere."""
    cfg = rng.normal(size=(k, C, *L))
    cfg[:, :, 0, 0] = np.arange(start, start + k)[:, None]
    scalars = {name: rng.normal(size=(k, C)) for name in IMH_SCALARS}
    scalars["accepted"] = rng.random((k, C)) < 0.5
    scalars["action"] = np.repeat(np.arange(start, start + k, dtype=float)[:, None], C, axis=1)
    return scalars, cfg


def _state(i: int) -> dict:
    return {"phi": np.full((C, *L), float(i)), "step": np.array(i, dtype=np.int64)}


def _write(path: Path, sizes: list[int], seed: int = 0, **kw: object) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    all_s: dict[str, list] = {k: [] for k in IMH_SCALARS}
    all_c = []
    n = 0
    with _create(path, **kw) as w:
        for k in sizes:
            s, c = _rows(n, k, rng)
            w.append(
                scalars=s,
                configs=c,
                state=_state(n + k),
                state_attrs={"n": n + k},
                wall_time=0.5 + k,
            )
            n += k
            for key in IMH_SCALARS:
                all_s[key].append(s[key])
            all_c.append(c)
        assert w.n == n
    return {k: np.concatenate(v) for k, v in all_s.items()}, np.concatenate(all_c)


def test_round_trip_bitwise(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    scalars, cfg = _write(path, [3, 5, 1], config_dtype="float64")
    with open_ensemble(path) as ens:
        assert isinstance(ens, Ensemble)
        assert ens.n == 9 and ens.n_chains == C and ens.lattice_shape == L
        assert ens.action == ACTION and ens.sampler == SAMPLER and ens.model_sha256 == SHA
        assert ens.seed == 1234 and ens.meta == {"note": "test", "config": {"beta": [1, 2]}}
        assert ens.scalar_names == tuple(IMH_SCALARS)
        a = ens.attrs
        assert a["format"] == "flowmc-ensemble" and a["schema_version"] == SCHEMA_VERSION
        assert a["command_line"] == "flowmc sample --test" and a["flowmc_version"]
        assert "T" in a["created"]
        assert ens.configs.shape == (9, C, *L) and ens.configs.dtype == np.float64
        np.testing.assert_array_equal(ens.configs[:], cfg)
        np.testing.assert_array_equal(ens.configs[2:7], cfg[2:7])
        np.testing.assert_array_equal(ens.configs[-1], cfg[-1])
        np.testing.assert_array_equal(ens.configs[::-2, 1], cfg[::-2, 1])
        np.testing.assert_array_equal(ens.configs[[4, 0, 4]], cfg[[4, 0, 4]])
        np.testing.assert_array_equal(np.asarray(ens.configs), cfg)
        with pytest.raises(IndexError):
            ens.configs[9]
        for name in IMH_SCALARS:
            np.testing.assert_array_equal(ens.scalar(name), scalars[name])
        assert ens.scalar("accepted").dtype == np.bool_
        assert ens.scalar("log_q").dtype == np.float64
        with pytest.raises(KeyError, match="available"):
            ens.scalar("delta_h")
        blocks = list(ens.iter_configs(chunk=4))
        assert [b.shape[0] for b in blocks] == [4, 4, 1]
        np.testing.assert_array_equal(np.concatenate(blocks), cfg)
        np.testing.assert_array_equal(ens.chunk_ends, [3, 8, 9])
        np.testing.assert_array_equal(ens.chunk_wall_times, [3.5, 5.5, 1.5])
        state, attrs = ens.load_state()
        np.testing.assert_array_equal(state["phi"], _state(9)["phi"])
        assert state["step"] == 9 and attrs == {"n": 9}
    # plain h5py sees the documented layout
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "flowmc-ensemble" and f.attrs["n"] == 9
        assert json.loads(f.attrs["action"]) == ACTION
        assert f["configs"].shape == (9, C, *L) and f["scalars/log_weight"].shape == (9, C)
        assert f["configs"].chunks[0] == 4


def test_float32_default_and_compression(tmp_path: Path) -> None:
    for comp in (None, "gzip", "lzf"):
        path = tmp_path / f"run_{comp}.h5"
        _, cfg = _write(path, [2, 3], compression=comp)
        with open_ensemble(path) as ens:
            assert ens.configs.dtype == np.float32
            np.testing.assert_array_equal(ens.configs[:], cfg.astype(np.float32))
            assert ens.attrs["compression"] == (comp or "")
        with h5py.File(path, "r") as f:
            assert f["configs"].compression == comp
    with pytest.raises(ValueError, match="config_dtype"):
        _create(tmp_path / "x.h5", config_dtype="float16")
    with pytest.raises(ValueError, match="compression"):
        _create(tmp_path / "x.h5", compression="bz2")


def test_no_configs_mode_hmc_scalars(tmp_path: Path) -> None:
    path = tmp_path / "hmc.h5"
    names = ["action", "accepted", "delta_h", "magnetization"]
    with _create(path, scalar_names=names, store_configs=False, model_sha256="") as w:
        s = {n: np.ones((2, C)) for n in names}
        w.append(
            scalars=s, configs=np.zeros((2, C, *L)), state={}, wall_time=0.1
        )  # configs ignored
        w.append(scalars=s, state={}, wall_time=0.1)
    with open_ensemble(path) as ens:
        assert ens.n == 4 and not ens.has_configs and ens.model_sha256 == ""
        assert ens.scalar("accepted").dtype == np.bool_ and ens.scalar("delta_h").shape == (4, C)
        with pytest.raises(ValueError, match="store_configs=False"):
            _ = ens.configs
    with h5py.File(path, "r") as f:
        assert "configs" not in f


def test_append_validation(tmp_path: Path) -> None:
    with _create(tmp_path / "v.h5") as w:
        s, c = _rows(0, 2, np.random.default_rng(0))
        with pytest.raises(ValueError, match="missing"):
            w.append(scalars={"action": s["action"]}, configs=c, state={}, wall_time=0)
        with pytest.raises(ValueError, match="Expected configs of shape"):
            w.append(scalars=s, configs=c[:, :, :2], state={}, wall_time=0)
        with pytest.raises(ValueError, match="Expected scalar 'log_q'"):
            w.append(scalars={**s, "log_q": np.zeros((3, C))}, configs=c, state={}, wall_time=0)
        with pytest.raises(ValueError, match="pass configs"):
            w.append(scalars=s, state={}, wall_time=0)
        assert w.n == 0
        # torch tensors are accepted
        w.append(
            scalars={k: torch.as_tensor(v) for k, v in s.items()},
            configs=torch.as_tensor(c),
            state={"phi": torch.zeros(C, *L)},
            wall_time=0,
        )
        assert w.n == 2
    with pytest.raises(RuntimeError, match="closed"):
        w.append(scalars=s, configs=c, state={}, wall_time=0)


def test_state_round_trip_bitwise_with_torch_generator(tmp_path: Path) -> None:
    path = tmp_path / "state.h5"
    gen = torch.Generator().manual_seed(7)
    torch.randn(5, generator=gen)
    rng_state = gen.get_state().numpy()
    phi = np.random.default_rng(1).normal(size=(C, *L))
    extra = {
        "phi": phi,
        "phi32": phi.astype(np.float32),
        "action": np.array([1e-300, -np.inf]),
        "rng": rng_state,
        "flags": np.array([True, False]),
        "empty": np.zeros((0, 3)),
        "count": np.int64(5),
    }
    state_attrs = {"step": 17, "step_size": 0.1 + 0.2, "name": "hmc", "eps": np.float64(0.5)}
    with _create(path) as w:
        assert not w.has_state
        with pytest.raises(LookupError):
            w.load_state()
        w.save_state(extra, state_attrs)  # before any rows (thermalisation)
        s, c = _rows(0, 2, np.random.default_rng(0))
        w.append(scalars=s, configs=c, state={"phi": np.zeros(3)}, wall_time=0)
        w.append(scalars=s, configs=c, state=extra, state_attrs=state_attrs, wall_time=0)
    with EnsembleWriter.resume(path) as w:
        arrays, attrs = w.load_state()
    assert attrs == state_attrs
    assert set(arrays) == set(extra)
    for k, v in extra.items():
        assert arrays[k].dtype == v.dtype and arrays[k].shape == v.shape
        assert arrays[k].tobytes() == v.tobytes()
    gen2 = torch.Generator()
    gen2.set_state(torch.from_numpy(arrays["rng"]))
    assert torch.equal(torch.randn(4, generator=gen2), torch.randn(4, generator=gen))


def test_resume_truncates_rows_beyond_n(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    _, cfg = _write(path, [3, 2])
    # Simulate a crash in the middle of an append: rows and a chunk entry written, n not updated.
    with h5py.File(path, "r+") as f:
        for name in ["configs"] + [f"scalars/{s}" for s in IMH_SCALARS]:
            f[name].resize(9, axis=0)
            f[name][5:] = 99
        for name, v in (("chunks/end", 9), ("chunks/wall_time", 1.0)):
            f[name].resize(3, axis=0)
            f[name][2] = v
    with open_ensemble(path) as ens:  # readers ignore the extra rows
        assert ens.n == 5 and ens.configs.shape[0] == 5 and ens.scalar("action").shape == (5, C)
        np.testing.assert_array_equal(ens.chunk_ends, [3, 5])
    with EnsembleWriter.resume(path, expect={"lattice_shape": list(L), "action": ACTION}) as w:
        assert w.n == 5
        f = w._f  # the writer's own handle: datasets were cut back to n rows
        assert f["configs"].shape[0] == 5 and f["scalars/action"].shape[0] == 5
        assert f["chunks/end"].shape == (2,)
        s, c = _rows(5, 1, np.random.default_rng(3))
        w.append(scalars=s, configs=c, state=_state(6), wall_time=0.1)
    with open_ensemble(path) as ens:
        assert ens.n == 6
        np.testing.assert_array_equal(ens.configs[:5], cfg.astype(np.float32))
        assert ens.configs[5, 0, 0, 0] == 5
        np.testing.assert_array_equal(ens.chunk_ends, [3, 5, 6])


def test_never_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    _write(path, [1])
    with pytest.raises(FileExistsError, match=r"x\.h5.*--force"):
        _create(path)
    with open_ensemble(path) as ens:
        assert ens.n == 1  # untouched
    _create(path, force=True).close()  # closed before its first commit: nothing replaced
    with open_ensemble(path) as ens:
        assert ens.n == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]  # no temp or lock file left
    with _create(path, force=True) as w:
        with open_ensemble(path) as ens:  # the old file stays until the first commit
            assert ens.n == 1
        w.save_state(_state(0))
    with open_ensemble(path) as ens:
        assert ens.n == 0 and ens.has_state


def test_bad_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match=r"notes\.txt.*not an HDF5 file"):
        open_ensemble(text)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"plain\.h5.*'format' is missing"):
        open_ensemble(plain)
    with pytest.raises(ValueError, match="not a flowmc ensemble"):
        EnsembleWriter.resume(plain)
    with pytest.raises(FileNotFoundError):
        open_ensemble(tmp_path / "missing.h5")

    good = tmp_path / "good.h5"
    _write(good, [2])
    newer = tmp_path / "newer.h5"
    newer.write_bytes(good.read_bytes())
    with h5py.File(newer, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(
        ValueError, match=rf"schema_version {SCHEMA_VERSION + 1}.*supports schema_version <= 1"
    ):
        open_ensemble(newer)
    other = tmp_path / "other.h5"
    other.write_bytes(good.read_bytes())
    with h5py.File(other, "r+") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(ValueError, match="'something-else'"):
        open_ensemble(other)

    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        trunc = tmp_path / f"trunc{cut}.h5"
        trunc.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"trunc{cut}\.h5.*corrupt or truncated"):
            open_ensemble(trunc)
    bad_n = tmp_path / "badn.h5"
    bad_n.write_bytes(data)
    with h5py.File(bad_n, "r+") as f:
        f.attrs.modify("n", np.int64(50))
    with pytest.raises(ValueError, match="has 2 rows but n = 50"):
        open_ensemble(bad_n)


@pytest.mark.parametrize(
    ("key", "given"),
    [
        ("lattice_shape", (4, 4)),
        ("action", {"m2": -4.0, "lam": 6.0}),
        ("model_sha256", "cd" * 32),
        ("n_chains", 3),
    ],
)
def test_resume_expectation_mismatch(tmp_path: Path, key: str, given: object) -> None:
    path = tmp_path / "e.h5"
    _write(path, [1])
    with pytest.raises(ValueError, match=rf"{key} mismatch: stored .* given"):
        EnsembleWriter.resume(path, expect={key: given})
    with pytest.raises(ValueError, match="Unknown expect keys"):
        EnsembleWriter.resume(path, expect={"colour": 1})
    EnsembleWriter.resume(
        path,
        expect={
            "lattice_shape": L,
            "n_chains": C,
            "model_sha256": SHA,
            "action": {"lam": 8, "m2": -4},
        },
    ).close()


def test_read_only_raises(tmp_path: Path) -> None:
    path = tmp_path / "ro.h5"
    _write(path, [1])
    with open_ensemble(path) as ens:
        with pytest.raises(RuntimeError, match="read-only"):
            ens.append(scalars={}, configs=None, state={}, wall_time=0)
        with pytest.raises(RuntimeError, match="read-only"):
            ens.save_state({})


def test_missing_h5py(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fe, "h5py", None)
    with pytest.raises(ImportError, match="install h5py to use flowmc ensembles"):
        open_ensemble(tmp_path / "x.h5")
    with pytest.raises(ImportError, match="install h5py"):
        _create(tmp_path / "x.h5")


def test_file_sha256(tmp_path: Path) -> None:
    import hashlib

    p = tmp_path / "model.pt"
    data = os.urandom(3000)
    p.write_bytes(data)
    assert file_sha256(p, block_size=256) == hashlib.sha256(data).hexdigest()


_KILL_WRITER = textwrap.dedent(
    """
    import os, sys, time, types
    import numpy as np
    pkg = types.ModuleType("flowmc")  # a bare package: skips flowmc/__init__ (and torch)
    pkg.__path__ = [os.path.dirname(os.path.dirname(sys.argv[1]))]  # flowmc/io/.. = flowmc/
    sys.modules["flowmc"] = pkg
    import flowmc.io.ensemble as ens
    C, L, k = 3, (6, 6), 4
    w = ens.EnsembleWriter.create(sys.argv[2], lattice_shape=L, n_chains=C, action={}, sampler={},
                                  scalar_names=["action", "accepted"], chunk_size=16)
    i = 0
    while True:
        rows = np.arange(i, i + k, dtype=np.float64)
        w.append(scalars={"action": np.repeat(rows[:, None], C, 1),
                          "accepted": np.repeat(rows[:, None], C, 1) % 2 == 1},
                 configs=np.broadcast_to(rows[:, None, None, None], (k, C, *L)),
                 state={"last": np.array([i + k - 1])}, state_attrs={"n": i + k}, wall_time=0.0)
        i += k
        if i == k:
            print("ready", flush=True)
        time.sleep(0.002)
    """
)


def test_sigkill_leaves_consistent_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.h5"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_WRITER, fe.__file__, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.4)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    with open_ensemble(path) as ens:
        n = ens.n
        assert n >= 4 and n % 4 == 0
        idx = np.arange(n)
        np.testing.assert_array_equal(
            ens.configs[:], np.broadcast_to(idx[:, None, None, None], (n, 3, 6, 6))
        )
        np.testing.assert_array_equal(
            ens.scalar("action"), np.repeat(idx[:, None].astype(float), 3, 1)
        )
        np.testing.assert_array_equal(
            ens.scalar("accepted"), np.repeat(idx[:, None] % 2 == 1, 3, 1)
        )
        np.testing.assert_array_equal(ens.chunk_ends, np.arange(4, n + 1, 4))
        state, attrs = ens.load_state()
        assert state["last"][0] == n - 1 and attrs == {"n": n}
    with EnsembleWriter.resume(path) as w:  # and it can be resumed
        assert w.n == n
