"""Write failures (disk full, I/O errors) never pass silently (issue 14, item 1).

Faults are injected through :attr:`flowmc.io.durable.DurableFile.fault_hook`, which is called before
every low-level ``write``/``truncate``/``fsync`` that HDF5 (through h5py's ``fileobj`` driver) or
the checkpoint writer performs, and raises there exactly as the system call would. No mount is
needed. Before this change the same failures went unnoticed: h5py ignores errors raised while it
closes a dataset handle, so a full disk gave a file with ``n`` = 20000 whose rows were garbage, a
success message, and a segfault at exit.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from flowmc.cli import main
from flowmc.io.checkpoint import load_checkpoint
from flowmc.io.durable import DurableFile, deferred_sigint
from flowmc.io.ensemble import EnsembleWriter, open_ensemble
from flowmc.lattice.action import Phi4Action
from tests.helpers import save_small_flow

C, L = 2, (4, 3)
SIZES = (3, 5, 2)
ENDS = tuple(int(e) for e in np.cumsum(SIZES))
NAMES = ["action", "accepted"]


def _chunk(i: int) -> dict:
    """Chunk ``i`` of the test run (depends on ``i`` only, so a resumed run writes the same)."""
    rng = np.random.default_rng(100 + i)
    k = SIZES[i]
    return {
        "scalars": {"action": rng.normal(size=(k, C)), "accepted": rng.random((k, C)) < 0.5},
        "configs": rng.normal(size=(k, C, *L)),
        "state": {"phi": rng.normal(size=(C, *L)), "rng": rng.integers(0, 255, 40, np.uint8)},
        "state_attrs": {"chunk": i},
        "wall_time": 0.25 * (i + 1),
    }


def _write_run(path: Path, progress: list[int]) -> None:
    """Create ``path`` (or resume it) and write every missing chunk, like a sampler does.

    ``progress`` receives the committed ``n`` after every commit (a first ``save_state``, as the
    HMC driver does after warm-up, then one ``append`` per chunk).
    """
    if path.exists():
        w = EnsembleWriter.resume(path)
    else:
        w = EnsembleWriter.create(path, lattice_shape=L, n_chains=C, scalar_names=NAMES,
                                  action={"m2": -1.0}, sampler={"name": "test"}, chunk_size=4,
                                  command_line="test")
    with w:
        if w.n == 0 and not w.has_state:
            w.save_state({"phi": np.zeros((C, *L))}, {"chunk": -1})
            progress.append(0)
        for i in range(ENDS.index(w.n) + 1 if w.n else 0, len(SIZES)):
            w.append(**_chunk(i))
            progress.append(w.n)


def _dump(path: Path) -> dict:
    with open_ensemble(path) as ens:
        out = {"n": ens.n, "configs": np.asarray(ens.configs).tobytes(),
               "ends": ens.chunk_ends.tobytes(), "wall": ens.chunk_wall_times.tobytes()}
        out.update({k: ens.scalar(k).tobytes() for k in ens.scalar_names})
        arrays, attrs = ens.load_state()
        out.update({f"state/{k}": v.tobytes() for k, v in arrays.items()})
        out["state_attrs"] = attrs
    return out


def _fail_at(op: str, k: int, code: int = errno.ENOSPC) -> object:
    """A fault hook that raises ``OSError(code)`` at the ``k``-th operation ``op``."""
    seen = {"n": 0}

    def hook(kind: str, path: str, nbytes: int) -> None:
        if kind == op:
            seen["n"] += 1
            if seen["n"] == k:
                raise OSError(code, os.strerror(code))

    return hook


def _count(op: str, run: object) -> int:
    seen = []
    DurableFile.fault_hook = lambda kind, path, nbytes: seen.append(kind)
    try:
        run()
    finally:
        DurableFile.fault_hook = None
    return seen.count(op)


def _stray(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".lock" in p.name)


@pytest.mark.parametrize(("op", "code"), [("write", errno.ENOSPC), ("truncate", errno.EFBIG),
                                          ("fsync", errno.EIO), ("reserve", errno.ENOSPC)])
def test_failure_at_every_low_level_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, code: int
) -> None:
    """A failure at the k-th write (or truncate, fsync, space reservation) of a whole run, for
    every k (every other k for writes, to save time; all k pass too): an error is raised, the
    file is absent
    (failure before the first commit) or opens with its last commit, and resuming completes it
    bit-identically to an uninterrupted run.

    Failed before: errors inside HDF5's chunk flushes were swallowed (no error, garbage rows),
    and resuming in place a file whose HDF5 structures were half written failed ("addr
    overflow", "name already exists") or crashed HDF5; resume now rebuilds such a file.
    """
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # speed: the kernel's fsync is not tested
    ref = tmp_path / "ref.h5"
    n_ops = _count(op, lambda: _write_run(ref, []))
    assert n_ops >= {"write": 60, "truncate": 1, "fsync": 8, "reserve": 4}[op]  # a real run
    reference = _dump(ref)
    for k in range(1, n_ops + 1, 2 if op == "write" else 1):
        path = tmp_path / f"{op}{k}.h5"
        progress: list[int] = []
        monkeypatch.setattr(DurableFile, "fault_hook", _fail_at(op, k, code))
        with pytest.raises(OSError) as info:
            _write_run(path, progress)
        monkeypatch.setattr(DurableFile, "fault_hook", None)
        msg = str(info.value)
        assert info.value.errno == code and os.strerror(code) in msg, (k, msg)
        assert "\n" not in msg
        if not progress:
            attempted = 0  # the first commit (save_state) failed
        elif progress[-1] == ENDS[-1]:
            attempted = ENDS[-1]  # everything committed; the final close failed
        else:
            attempted = ENDS[ENDS.index(progress[-1]) + 1 if progress[-1] else 0]
        if not path.exists():  # failed before the first commit: nothing under the name
            assert "nothing was written" in msg, (k, msg)
        else:
            with open_ensemble(path) as ens:
                n_disk = ens.n
                assert ens.has_state
            allowed = {progress[-1], attempted} if progress else {0}
            assert n_disk in allowed, (k, n_disk, allowed)
            assert f"n = {n_disk}" in msg, (k, msg)
            assert "--resume" in msg or (n_disk == ENDS[-1] and "already on disk" in msg), msg
            assert _dump(path)["configs"] == reference["configs"][: len(_dump(path)["configs"])]
        assert _stray(tmp_path) == [], k
        _write_run(path, [])  # resume (or start again) without faults
        assert _dump(path) == reference, k


def test_full_disk_is_found_before_a_commit_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Space for a commit is allocated (posix_fallocate) before it writes: a full disk fails
    there, the file is left whole and marked clean, and --resume continues it in place."""
    ref, path = tmp_path / "ref.h5", tmp_path / "full.h5"
    _write_run(ref, [])
    monkeypatch.setattr(DurableFile, "fault_hook", _fail_at("reserve", 3))  # 2nd append
    progress: list[int] = []
    with pytest.raises(OSError, match=rf"needs up to .* MiB\); the file keeps its last commit "
                                      rf"\(n = {ENDS[0]} rows per chain\) and is consistent"):
        _write_run(path, progress)
    monkeypatch.setattr(DurableFile, "fault_hook", None)
    assert progress == [0, ENDS[0]]
    with open_ensemble(path) as ens:
        assert ens.attrs["writing"] == 0  # closed cleanly: resumed in place, not rebuilt
    inode = path.stat().st_ino
    _write_run(path, [])
    assert path.stat().st_ino == inode and _dump(path) == _dump(ref)


def test_poisoned_writer_refuses_writes_and_closes_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.h5"
    w = EnsembleWriter.create(path, lattice_shape=L, n_chains=C, scalar_names=NAMES,
                              action={}, sampler={"name": "test"})
    w.append(**_chunk(0))
    monkeypatch.setattr(DurableFile, "fault_hook", _fail_at("write", 3))
    with pytest.raises(OSError, match=rf"n = {ENDS[0]} rows per chain.*--resume"):
        w.append(**_chunk(1))
    monkeypatch.setattr(DurableFile, "fault_hook", None)
    assert w.failed and "failed" in repr(w)
    with pytest.raises(RuntimeError, match="failed earlier"):
        w.append(**_chunk(1))
    with pytest.raises(RuntimeError, match="failed earlier"):
        w.save_state({"phi": np.zeros(3)})
    w.close()  # no error, no crash
    w.close()
    with open_ensemble(path) as ens:
        assert ens.n == ENDS[0]


_FAIL_AND_EXIT = textwrap.dedent(
    """
    import errno, os, sys, types
    import numpy as np
    pkg = types.ModuleType("flowmc")  # a bare package: skips flowmc/__init__ (and torch)
    pkg.__path__ = [sys.argv[1]]
    sys.modules["flowmc"] = pkg
    from flowmc.io.durable import DurableFile
    from flowmc.io.ensemble import EnsembleWriter
    k = int(sys.argv[3])
    seen = [0]
    def hook(op, path, nbytes):
        if op == "write":
            seen[0] += 1
            if seen[0] >= k:  # the disk stays full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    w = EnsembleWriter.create(sys.argv[2], lattice_shape=(8, 8), n_chains=1, action={},
                              sampler={"name": "t"}, scalar_names=["action"])
    DurableFile.fault_hook = hook
    i = 0
    try:
        while True:
            w.append(scalars={"action": np.zeros((512, 1))}, configs=np.ones((512, 1, 8, 8)),
                     state={"i": np.array(i)}, wall_time=0.0)
            i += 1
    except OSError as e:
        print("failed:", e, flush=True)
    datasets = [w._f["configs"], w._f["scalars/action"]]  # handles alive until exit
    w.close()
    """
)


def test_failed_writer_never_crashes_the_process(tmp_path: Path) -> None:
    """Failed before: after ENOSPC, h5py's dataset handles could not be closed ("Can't
    decrement id ref count") and the interpreter segfaulted at exit (rc 139)."""
    pkg_dir = Path(__file__).resolve().parents[2] / "flowmc"
    for k in (40, 95):
        out = tmp_path / f"crash{k}.h5"
        r = subprocess.run([sys.executable, "-c", _FAIL_AND_EXIT, str(pkg_dir), str(out), str(k)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "failed: Writing ensemble" in r.stdout and "No space left" in r.stdout
        assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        with open_ensemble(out) as ens:  # the last commit is intact
            assert ens.n % 512 == 0 and ens.n > 0
            np.testing.assert_array_equal(ens.configs[:], 1.0)
            assert int(ens.load_state()[0]["i"]) == ens.n // 512 - 1


# ------------------------------------------------------------------------------ the commands


def _ensemble_bytes(path: Path) -> dict:
    with open_ensemble(path) as ens:
        out = {k: ens.scalar(k).tobytes() for k in ens.scalar_names}
        out["configs"] = np.asarray(ens.configs).tobytes()
        out["n"] = ens.n
        arrays, attrs = ens.load_state()
        out.update({f"state/{k}": v.tobytes() for k, v in arrays.items()})
        out["state_attrs"] = attrs
    return out


def test_sample_disk_full_fails_loudly_and_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``flowmc sample`` on a full disk: exit 2 with one line, no success line, and the file
    keeps its last commit; ``--resume`` then equals an uninterrupted run.

    Failed before: success printed, rc 139 at exit, n = 20000 with 13,856 wrong rows.
    """
    model = save_small_flow(tmp_path / "m.pt")
    args = ["sample", "--model", str(model), "--n", "200", "--batch", "64", "--chains", "2",
            "--seed", "5", "--quiet"]
    ref = tmp_path / "ref.h5"
    n_writes = _count("write", lambda: main([*args, "--out", str(ref)]))
    reference = _ensemble_bytes(ref)
    capsys.readouterr()
    for k in (5, n_writes // 2, n_writes - 10):
        out = tmp_path / f"k{k}.h5"
        monkeypatch.setattr(DurableFile, "fault_hook", _fail_at("write", k))
        assert main([*args, "--out", str(out)]) == 2
        monkeypatch.setattr(DurableFile, "fault_hook", None)
        cap = capsys.readouterr()
        assert cap.out == ""  # no success message
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], cap.err
        assert lines[0].startswith(("flowmc sample: error: Writing ensemble",
                                    "flowmc sample: error: Cannot create ensemble"))
        if out.exists():
            assert "continue with --resume" in lines[0]
            with open_ensemble(out) as ens:
                assert 0 <= ens.n < 200 and ens.n % 64 == 0 and ens.has_state
            assert main([*args, "--out", str(out), "--resume"]) == 0
        else:
            assert "nothing was written" in lines[0]
            assert main([*args, "--out", str(out)]) == 0
        capsys.readouterr()
        assert _ensemble_bytes(out) == reference
        assert _stray(tmp_path) == []


def test_hmc_disk_full_at_first_commit_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The HMC driver's first commit (state after warm-up) fails: no file under the name."""
    out = tmp_path / "h.h5"
    argv = ["hmc", "--L", "4", "--m2", "-4", "--lam", "8", "--n", "10", "--warmup", "5",
            "--chunk", "5", "--out", str(out), "--quiet"]
    monkeypatch.setattr(DurableFile, "fault_hook", _fail_at("fsync", 1, errno.EIO))
    assert main(argv) == 2
    monkeypatch.setattr(DurableFile, "fault_hook", None)
    err = capsys.readouterr().err
    assert "Input/output error" in err and "nothing was written" in err, err
    assert not out.exists() and _stray(tmp_path) == []
    assert main(argv) == 0


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Checkpoints are written to a temporary file, fsync-ed and renamed: a failed save exits
    2 with one line and leaves the previous checkpoint byte for byte."""
    out = tmp_path / "t.pt"
    base = ["train", "--L", "4", "--m2", "-4", "--lam", "8", "--layers", "1", "--hidden", "2",
            "--batch", "8", "--out", str(out), "--quiet", "--symmetric"]
    assert main([*base, "--steps", "2"]) == 0
    before = out.read_bytes()
    monkeypatch.setattr(DurableFile, "fault_hook", _fail_at("write", 1))
    assert main(["train", "--resume", "--out", str(out), "--steps", "4", "--quiet"]) == 2
    monkeypatch.setattr(DurableFile, "fault_hook", None)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the "resuming ..." note
    assert err.startswith("flowmc train: error: Cannot write checkpoint")
    assert "previous checkpoint there is unchanged" in err
    assert out.read_bytes() == before and _stray(tmp_path) == []
    assert load_checkpoint(out)["trainer_state"]["step"] == 2


def test_ctrl_c_during_a_commit_is_delivered_after_it() -> None:
    """A SIGINT inside :func:`deferred_sigint` arrives as ``KeyboardInterrupt`` once the block
    ends, never inside it; an ignored SIGINT (``nohup``, a background job of a shell without job
    control) stays ignored. Negative control: without the deferral it lands inside the block.
    """
    def block(steps: list[str]) -> None:
        steps.append("start")
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # bytecode boundaries where a pending handler would run
            pass
        steps.append("end")

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        steps: list[str] = []
        with pytest.raises(KeyboardInterrupt):
            with deferred_sigint():
                block(steps)
        assert steps == ["start", "end"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        steps = []  # negative control: the same block, not deferred, is cut short
        with pytest.raises(KeyboardInterrupt):
            block(steps)
        assert steps == ["start"]

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        steps = []
        with deferred_sigint():
            block(steps)
        assert steps == ["start", "end"]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


# ------------------------------------------------------------------------ the publish primitive


def _publishers(tmp_path: Path) -> dict[str, tuple[Path, object]]:
    """Every writer that publishes through :func:`flowmc.io.durable.publish`: its output (an
    earlier version already in place) and a call that writes a new version of it."""
    from flowmc.io import ensemble, safeio
    from flowmc.io.durable import write_atomically
    from flowmc.io.join import join_shards, shard_path
    from flowmc.sampling.run import HMCSettings, RunConfig, run_ensemble

    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"old")
    report = tmp_path / "r.json"
    safeio.write_atomic(report, b'{"flowmc_report": "eval", "v": 1}', fmt="json", kind="eval")
    unclean = tmp_path / "unclean.h5"  # what resume rebuilds when writing != 0
    _write_run(unclean, [])

    def rebuild() -> None:
        with h5py.File(unclean, "r") as f:
            ensemble._rebuild(f, str(unclean), ensemble._validate_root(f, str(unclean)))

    joined = tmp_path / "sh.h5"
    action = Phi4Action(-1.0, 1.0, (4, 4))
    for rank, first in enumerate((0, 2)):
        config = RunConfig(n=4, chains=2, first_chain=first, seed=1, chunk=2,
                           hmc=HMCSettings(warmup=2, step_size=0.2))  # fmt: skip
        run_ensemble(shard_path(joined, rank, 2), config, action=action, progress=False,
                     meta={"shard": {"job": "j", "rank": rank, "world_size": 2}})  # fmt: skip
    join_shards(joined)
    return {
        "write_atomically": (blob, lambda: write_atomically(str(blob), b"new")),
        "report": (report, lambda: safeio.write_atomic(
            report, b'{"flowmc_report": "eval", "v": 2}', fmt="json", kind="eval")),
        "rebuild": (unclean, rebuild),
        "join": (joined, lambda: join_shards(joined)),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["write_atomically", "report", "rebuild", "join"])
def test_publish_failure_at_every_step_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Each of the four writers that publish a file (checkpoints, reports, the rebuild of an
    ensemble, the join of a sharded one) goes through :func:`flowmc.io.durable.publish`: a
    failure at the k-th write, fsync or the rename, for every k, raises, leaves the previous
    file byte for byte and no temporary file. A failure of the last step, the ``fsync`` of the
    directory, comes after the rename: the new file is in place (for reports it is ignored).
    Without faults the writer replaces the file (the control)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # speed: the kernel's fsync is not tested
    path, write = _publishers(tmp_path)[name]
    before, inode = path.read_bytes(), path.stat().st_ino
    seen: list[tuple[str, str]] = []
    DurableFile.fault_hook = lambda op, p, nbytes: seen.append((op, p))
    try:
        write()
    finally:
        DurableFile.fault_hook = None
    assert path.stat().st_ino != inode and _stray(tmp_path) == []  # a new file (a join may
    inode = path.stat().st_ino  # have the same bytes: the same rows, in the same second)
    ops = [op for op, p in seen]
    assert ops.count("replace") == 1 and ops[-2:] == ["replace", "fsync"], ops
    assert seen[-1][1] == str(path.parent) and seen[-2][1] == str(path)
    for op in ("write", "fsync", "replace"):
        n_before_rename = ops[: ops.index("replace") + 1].count(op)
        assert n_before_rename >= 1, (op, ops)
        for k in range(1, n_before_rename + 1):
            path.write_bytes(before)
            monkeypatch.setattr(DurableFile, "fault_hook", _fail_at(op, k, errno.EIO))
            with pytest.raises(OSError) as info:
                write()
            monkeypatch.setattr(DurableFile, "fault_hook", None)
            assert info.value.errno == errno.EIO, (op, k, info.value)
            assert path.read_bytes() == before and path.stat().st_ino == inode, (op, k)
            assert _stray(tmp_path) == [], (op, k)
    # the directory's fsync, after the rename: the new file is in place, no temporary file
    path.write_bytes(before)
    last_fsync = _fail_at("fsync", ops.count("fsync"), errno.EIO)
    monkeypatch.setattr(DurableFile, "fault_hook", last_fsync)
    if name == "report":  # best effort for reports
        write()
    else:
        with pytest.raises(OSError):
            write()
    monkeypatch.setattr(DurableFile, "fault_hook", None)
    assert path.stat().st_ino != inode and _stray(tmp_path) == []


def test_publish_verify_and_block_failures(tmp_path: Path) -> None:
    """``verify`` runs on the complete temporary file just before the rename; an exception
    from it or from the block leaves the old file and no temporary file."""
    from flowmc.io.durable import publish

    path = tmp_path / "x"
    path.write_bytes(b"old")
    checked = []
    with publish(path, verify=lambda temp: checked.append(Path(temp).read_bytes())) as staged:
        assert Path(staged.temp).parent == tmp_path and ".tmp-" in staged.temp
        staged.open().write(b"new")
    assert checked == [b"new"] and path.read_bytes() == b"new"

    def refuse(temp: str) -> None:
        raise FileExistsError("no")

    for verify, block_error in ((refuse, None), (None, KeyboardInterrupt)):
        with pytest.raises((FileExistsError, KeyboardInterrupt)):
            with publish(path, verify=verify) as staged:
                staged.open().write(b"newer")
                if block_error is not None:
                    raise block_error
        assert path.read_bytes() == b"new" and _stray(tmp_path) == []
    (tmp_path / f".x.tmp-{os.getpid()}").write_bytes(b"left by a killed run")  # removed first
    with publish(path) as staged:
        staged.open().write(b"newest")
    assert path.read_bytes() == b"newest" and _stray(tmp_path) == []
