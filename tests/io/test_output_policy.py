"""Outputs appear only when valid, ``--force`` replaces only what the command wrote, and one
writer per output name (issue 14, items 2 and 3).

Each test names what failed before this change.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from flowmc.cli import main
from flowmc.io.checkpoint import claim_output
from flowmc.io.ensemble import EnsembleWriter, check_output, open_ensemble
from tests.helpers import save_small_flow

PKG_DIR = Path(__file__).resolve().parents[2] / "flowmc"
C, L = 2, (4, 4)


def _ensemble(path: Path, n: int = 3) -> Path:
    with EnsembleWriter.create(path, lattice_shape=L, n_chains=C, scalar_names=["action"],
                               action={}, sampler={"name": "test"}) as w:
        w.append(scalars={"action": np.zeros((n, C))}, configs=np.zeros((n, C, *L)),
                 state={"i": np.array(n)}, wall_time=0.0)
    return path


def _sample(model: Path, out: Path | str, *extra: str) -> int:
    return main(["sample", "--model", str(model), "--n", "40", "--batch", "16", "--out",
                 str(out), "--quiet", *extra])


def _one_error_line(capsys: pytest.CaptureFixture, command: str = "sample") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flowmc {command}: error: "), err
    return err[0]


# --------------------------------------------------------------------- atomic creation (14.2)


_KILLED_BEFORE_COMMIT = textwrap.dedent(
    """
    import os, sys, time, types
    pkg = types.ModuleType("flowmc")  # a bare package: skips flowmc/__init__ (and torch)
    pkg.__path__ = [sys.argv[1]]
    sys.modules["flowmc"] = pkg
    from flowmc.io.ensemble import EnsembleWriter
    w = EnsembleWriter.create(sys.argv[2], lattice_shape=(4, 4), n_chains=2, action={},
                              sampler={"name": "t"}, scalar_names=["action"], force=True)
    print("created", flush=True)
    if sys.argv[3] == "commit":
        import numpy as np
        w.save_state({"phi": np.zeros(3)})
        print("committed", flush=True)
    time.sleep(60)
    """
)


def _writer_process(path: Path, what: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BEFORE_COMMIT, str(PKG_DIR),
                             str(path), what], stdout=subprocess.PIPE, text=True)
    for _ in range(1 + (what == "commit")):
        assert proc.stdout.readline().strip() in ("created", "committed")
    return proc


def test_killed_before_first_commit_leaves_no_stub(tmp_path: Path) -> None:
    """A run killed (OOM killer, SIGKILL) between creating its ensemble and its first commit
    leaves nothing under the name, and an existing ensemble there is unchanged.

    Failed before: a 0/96-byte or n = 0 stub without state stood under the name, and
    --resume of it died with a LookupError traceback.
    """
    fresh, old = tmp_path / "fresh.h5", _ensemble(tmp_path / "old.h5", n=5)
    for path in (fresh, old):
        proc = _writer_process(path, "create")
        proc.kill()
        proc.wait(timeout=30)
    assert not fresh.exists()
    with open_ensemble(old) as ens:
        assert ens.n == 5  # --force replaces only at the first commit
    stale = sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name)
    assert len(stale) == 2  # hidden temporary files of the killed runs, never read as ensembles
    with pytest.raises(FileNotFoundError, match="start it again without --resume"):
        EnsembleWriter.resume(fresh)
    _ensemble(fresh)  # a new run is not disturbed by the stale temporary file or lock file
    with open_ensemble(fresh) as ens:
        assert ens.n == 3


def test_resume_of_a_file_without_committed_state_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Legacy stubs: an n = 0 ensemble without state (older flowmc), an empty file, and an
    HDF5 superblock only. Failed before: LookupError / h5py tracebacks."""
    model = save_small_flow(tmp_path / "m.pt")
    stub = tmp_path / "stub.h5"
    assert _sample(model, stub) == 0
    with h5py.File(stub, "r+") as f:  # as left by an older flowmc killed before its 1st commit
        f.attrs.modify("n", np.int64(0))
        for slot in ("slot0", "slot1"):
            f["state"][slot].attrs.modify("n", np.int64(-1))
    assert _sample(model, stub, "--resume") == 2
    assert "holds no committed sampler state" in _one_error_line(capsys)
    assert _sample(model, stub, "--force") == 0  # it is a flowmc ensemble: --force replaces it
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    sb_only = tmp_path / "sb.h5"
    sb_only.write_bytes(_ensemble(tmp_path / "x.h5").read_bytes()[:96])
    for path, why in ((empty, "not an HDF5 file"), (sb_only, "HDF5 cannot open it")):
        assert _sample(model, path, "--resume") == 2
        assert why in _one_error_line(capsys)
        assert _sample(model, path, "--force") == 2  # not recognisably ours: never replaced
        assert "refuses to replace" in _one_error_line(capsys)


def test_device_failure_leaves_no_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Failed before: ``--device meta`` raised a traceback after creating a stub file."""
    model = save_small_flow(tmp_path / "m.pt")
    assert _sample(model, tmp_path / "d.h5", "--device", "meta") == 2
    assert "Expected --device cpu, cuda, cuda:N or mps; got 'meta'" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# ------------------------------------------------------------------------- --force (14.3)


def test_force_never_replaces_what_the_command_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--force`` replaces only a regular file holding what the command writes.

    Failed before: ``--out /dev/null --force`` unlinked the device node, and a checkpoint, a
    text file, a fifo or a symlinked ensemble elsewhere were replaced silently.
    """
    model = save_small_flow(tmp_path / "m.pt")
    target = _ensemble(tmp_path / "elsewhere.h5")
    text = tmp_path / "notes.h5"
    text.write_text("my data\n")
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    folder = tmp_path / "dir.h5"
    folder.mkdir()
    cases = {
        "/dev/null": "character device",
        str(model): "it is a flowmc checkpoint, so it is not a flowmc ensemble",
        str(text): "it is a file flowmc did not write",
        str(fifo): "named pipe",
        str(link): "symbolic link",
        str(folder): "directory",
    }
    for out, why in cases.items():
        before = os.lstat(out)
        assert _sample(model, out, "--force") == 2, out
        line = _one_error_line(capsys)
        assert "refuses to replace" in line and why in line, line
        after = os.lstat(out)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode), out
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert text.read_text() == "my data\n"
    # the training command: only a flowmc checkpoint is replaced
    train = ["train", "--L", "4", "--m2", "-4", "--lam", "8", "--layers", "1", "--hidden", "2",
             "--batch", "8", "--steps", "1", "--quiet", "--force", "--symmetric", "--out"]
    for out in (target, text, "/dev/null"):
        assert main([*train, str(out)]) == 2
        assert "refuses to replace" in _one_error_line(capsys, "train")
    assert main([*train, str(model)]) == 0  # a checkpoint: replaced
    with pytest.raises(FileExistsError, match="it is a flowmc ensemble .HDF5., so it is not a "
                                              "flowmc checkpoint"):
        claim_output(target, force=True)


def test_two_writers_of_one_name(tmp_path: Path) -> None:
    """A second writer of the same name fails at once, with --force or --resume, while the
    first one is running (another process), before and after its first commit.

    Failed before: two ``flowmc sample --force`` on one path both printed success and one
    run's data was silently gone.
    """
    path = tmp_path / "busy.h5"
    for phase in ("create", "commit"):
        proc = _writer_process(path, phase)
        try:
            with pytest.raises(BlockingIOError, match="being written by another flowmc process"):
                EnsembleWriter.create(path, lattice_shape=L, n_chains=C, scalar_names=["a"],
                                      action={}, sampler={}, force=True)
            if phase == "commit":
                with pytest.raises(BlockingIOError, match="another"):
                    EnsembleWriter.resume(path)
                with pytest.raises(BlockingIOError, match="being written by another flowmc"):
                    check_output(path, force=True)  # the early check of the commands
                with pytest.raises(OSError, match="locked by another process"):
                    open_ensemble(path)  # readers are told, as with HDF5's own locking
        finally:
            proc.kill()
            proc.wait(timeout=30)
    with EnsembleWriter.resume(path) as w:  # the killed writer's lock is gone with it
        assert w.n == 0 and w.has_state
    fd = os.open(path, os.O_RDONLY)  # any other program that holds the file locked
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(BlockingIOError, match="open in another process"):
            check_output(path, force=True)
        with pytest.raises(BlockingIOError, match="open in another process"):
            EnsembleWriter.resume(path)
    finally:
        os.close(fd)
    with claim_output(tmp_path / "m.pt"):
        with pytest.raises(BlockingIOError, match="being written by another flowmc process"):
            claim_output(tmp_path / "m.pt")


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_concurrent_sample_runs_and_ctrl_c(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two real ``flowmc sample --force`` on one path: the second is refused with one line;
    Ctrl-C (SIGINT) stops the first with one line saying how to resume, exit 130, and its
    file resumes to the same bytes as an uninterrupted run.

    Failed before: both printed success (one run's data lost); Ctrl-C gave a traceback.
    """
    model = save_small_flow(tmp_path / "m.pt")
    out = _ensemble(tmp_path / "run.h5")  # an old ensemble that --force replaces
    old_inode = out.stat().st_ino
    args = ["--model", str(model), "--batch", "64", "--chains", "2", "--seed", "3", "--quiet",
            "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowmc.cli", "sample", *args, "--n", "10000000", "--out",
         str(out), "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=PKG_DIR.parent, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        # as a terminal starts a foreground job: a shell without job control starts background
        # jobs with SIGINT ignored, which the child would inherit (and rightly keep ignoring)
        preexec_fn=_sigint_default,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and out.stat().st_ino == old_inode:  # first commit
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert out.stat().st_ino != old_inode
        assert main(["sample", *args, "--n", "64", "--out", str(out), "--force"]) == 2
        assert "being written by another flowmc process" in _one_error_line(capsys)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # say where it hangs
            proc.send_signal(signal.SIGABRT)  # faulthandler dumps every thread's stack
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"no exit within 60 s of SIGINT; the child's stacks:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowmc sample: interrupted; "), err
    assert "continue with --resume" in lines[0]
    with open_ensemble(out) as ens:
        n = ens.n
    assert f"holds n = {n} committed rows per chain" in lines[0] and n % 64 == 0
    ref = tmp_path / "ref.h5"
    assert main(["sample", *args, "--n", str(n + 64), "--out", str(ref)]) == 0
    assert main(["sample", *args, "--n", str(n + 64), "--out", str(out), "--resume"]) == 0
    with open_ensemble(out) as a, open_ensemble(ref) as b:
        np.testing.assert_array_equal(np.asarray(a.configs), np.asarray(b.configs))
        for k in a.scalar_names:
            np.testing.assert_array_equal(a.scalar(k), b.scalar(k))
