"""The schema module is the one home of the root attributes and the dataset names: every writer
(create, the rebuild on resume, the join of a sharded run) and the reader agree with it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from flowmc.io import ensemble, schema
from flowmc.io.ensemble import EnsembleWriter, open_ensemble

L, C = (4, 3), 2


def _memory_file() -> h5py.File:
    return h5py.File("mem.h5", "w", driver="core", backing_store=False)


def _root(**kw: object) -> dict:
    args = dict(n=0, lattice_shape=L, n_chains=C, action={"m2": -1.0}, sampler={"name": "t"},
                meta={}, scalar_names=["action", "accepted"], store_configs=True, seed=None,
                writing=1, flowmc_version="0", created="now", command_line="cmd",
                model_sha256="", config_dtype="float32", compression="")  # fmt: skip
    return schema.root_attrs(**{**args, **kw})


def test_dataset_names() -> None:
    assert schema.row_datasets(store_configs=False, scalar_names=("a",)) == ["scalars/a"]
    assert schema.datasets(store_configs=True, scalar_names=["a", "accepted"]) == [
        "configs", "scalars/a", "scalars/accepted", "chunks/end", "chunks/wall_time"]
    assert [schema.scalar_dtype(s) for s in ("is_accepted", "delta_h")] == [np.bool_, np.float64]


def test_root_attrs_order_encoding_and_omissions() -> None:
    root = _root(seed=7, shards={"job": "x"})
    assert list(root) == list(schema.ROOT_ATTRS)  # n first, every attribute, in order
    assert root["n"].dtype == np.int64 and root["seed"] == 7
    assert root["lattice_shape"].dtype == np.int64 and tuple(root["lattice_shape"]) == L
    assert root["store_configs"].dtype == np.bool_
    assert root["scalar_names"] == '["action", "accepted"]' and root["shards"] == '{"job": "x"}'
    root = _root(created=None, command_line=None, action='{"m2": 1}')  # text passes through
    assert "created" not in root and "command_line" not in root and "shards" not in root
    assert root["action"] == '{"m2": 1}' and root["seed"] == -1
    with pytest.raises(ValueError, match="Expected meta to be JSON-serialisable"):
        _root(meta={"x": object()})


def test_write_root_puts_n_first_and_reads_back() -> None:
    with _memory_file() as f:
        schema.write_root(f.attrs, _root())
        assert set(f.attrs) == set(schema.ROOT_ATTRS) - {"shards"}
        assert int(f.attrs["n"]) == 0 and f.attrs["format"] == schema.FORMAT


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_create_layout(compression: str | None) -> None:
    """The datasets of schema.datasets, empty and resizable; configs chunked by at most 4 MiB
    of rows (one row when compressed); two empty state slots."""
    with _memory_file() as f:
        schema.create_layout(f, lattice_shape=L, n_chains=C, scalar_names=["action", "accepted"],
                             store_configs=True, config_dtype="float64", compression=compression,
                             chunk_size=5)  # fmt: skip
        names = schema.datasets(store_configs=True, scalar_names=["action", "accepted"])
        for name in names:
            assert f[name].shape[0] == 0 and f[name].maxshape[0] is None
        assert f["configs"].chunks == ((1 if compression else 5), C, *L)
        assert f["scalars/accepted"].dtype == np.bool_ and f["scalars/action"].chunks == (5, C)
        for slot in schema.SLOTS:
            g = f[f"state/{slot}"]
            assert (int(g.attrs["n"]), int(g.attrs["seq"]), g.attrs["attrs_json"]) == (-1, -1, "{}")


def test_every_writer_writes_the_schema(tmp_path: Path) -> None:
    """create and the rebuild of resume write exactly the schema's attributes and datasets."""
    path = tmp_path / "e.h5"
    with EnsembleWriter.create(path, lattice_shape=L, n_chains=C, scalar_names=["action"],
                               action={}, sampler={"name": "t"}) as w:  # fmt: skip
        w.append(scalars={"action": np.zeros((2, C))}, configs=np.zeros((2, C, *L)),
                 state={"phi": np.zeros(3)}, wall_time=0.0)  # fmt: skip

    def layout(p: Path) -> tuple[set, set]:
        with h5py.File(p, "r") as f:
            found: set[str] = set()
            f.visititems(lambda name, obj: found.add(name) if isinstance(obj, h5py.Dataset)
                         and not name.startswith("state/") else None)  # fmt: skip
            return set(f.attrs), found

    want = (set(schema.ROOT_ATTRS) - {"shards"},
            set(schema.datasets(store_configs=True, scalar_names=["action"])))  # fmt: skip
    assert layout(path) == want
    with h5py.File(path, "r") as f:
        attrs = ensemble._validate_root(f, str(path))
        ensemble._rebuild(f, str(path), attrs)
    assert layout(path) == want
    with open_ensemble(path) as ens:
        assert ens.n == 2 and ens.attrs["writing"] == 0


def test_create_argument_checks() -> None:
    """The two checks create runs before it touches the disk."""
    assert ensemble._check_layout_args([4, 3], 2, ["a"], "float32", None, 8) == ((4, 3), 2, ("a",))
    for args, match in [
        (([4, 0], 2, ["a"], "float32", None, 8), "lattice_shape of positive extents"),
        (([4], 0, ["a"], "float32", None, 8), "n_chains >= 1"),
        (([4], 1, "a", "float32", None, 8), "a sequence of names"),
        (([4], 1, ["a", "a"], "float32", None, 8), "unique scalar_names"),
        (([4], 1, ["a/b"], "float32", None, 8), "without '/'"),
        (([4], 1, ["a"], "float16", None, 8), "config_dtype in"),
        (([4], 1, ["a"], "float32", "zip", 8), "compression in"),
        (([4], 1, ["a"], "float32", None, 0), "chunk_size >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            ensemble._check_layout_args(*args)
    rec = ensemble._check_provenance_args({"m2": 1}, {"name": "t"}, "", 3, None)
    assert rec == {"action": '{"m2": 1}', "sampler": '{"name": "t"}', "model_sha256": "",
                   "seed": 3, "meta": "{}"}  # fmt: skip
    with pytest.raises(ValueError, match="64 lowercase hex"):
        ensemble._check_provenance_args({}, {}, "abc", None, None)
    with pytest.raises(ValueError, match=r"integer in \[0, 2\*\*63\)"):
        ensemble._check_provenance_args({}, {}, "", -1, None)


def test_check_rows(tmp_path: Path) -> None:
    """append's check of its rows: 0/1 floats become booleans, k comes from the scalars."""
    with EnsembleWriter.create(tmp_path / "r.h5", lattice_shape=L, n_chains=C,
                               scalar_names=["action", "accepted"], action={},
                               sampler={"name": "t"}) as w:  # fmt: skip
        arrays, cfg, k = w._check_rows(
            {"action": np.ones((3, C), np.float32), "accepted": np.array([[0.0, 1.0]] * 3)},
            np.zeros((3, C, *L)),
        )
        assert k == 3 and cfg.shape == (3, C, *L)
        assert arrays["accepted"].dtype == np.bool_ and arrays["action"].dtype == np.float64
        with pytest.raises(ValueError, match="to hold booleans"):
            w._check_rows({"action": np.ones((1, C)), "accepted": np.full((1, C), 0.5)},
                          np.zeros((1, C, *L)))  # fmt: skip
        with pytest.raises(ValueError, match=r"configs of shape \(1, 2, 4, 3\)"):
            w._check_rows({"action": np.ones((1, C)), "accepted": np.ones((1, C), bool)},
                          np.zeros((2, C, *L)))  # fmt: skip
        assert w.n == 0  # nothing written
