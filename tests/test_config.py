"""Typed, validated options for TOML and flags alike (issue 14, item 4).

Every case here failed before this change (a traceback, a silently wrong value, or a stub
file); each now gives one line naming the file, the key, what was expected and what was given,
and exit code 2, before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowmc.cli import build_parser, main
from flowmc.config import IntRange, parse_with_config
from flowmc.io.ensemble import EnsembleWriter, open_ensemble

HMC = ["hmc", "--L", "4", "--m2", "-4", "--lam", "8", "--n", "6", "--warmup", "3", "--quiet"]


def _run(tmp_path: Path, capsys: pytest.CaptureFixture, toml: str, argv: list[str]) -> str:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(toml)
    assert main([*argv, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[hmc]\nforce = "false"\n',
         "key 'force': expected a boolean (true or false, without quotes); got 'false' (a string)"),
        ('[hmc]\nno_configs = "false"\n', "key 'no_configs': expected a boolean"),
        ("n = 2.5\n", "key 'n': expected an integer >= 1; got 2.5 (a float)"),
        ("[hmc]\nn = [100]\n", "key 'n': expected an integer >= 1; got [100] (an array)"),
        ("[hmc]\nout = 5\n", "key 'out': expected a string (a path); got 5 (an integer)"),
        ("[hmc]\nn = 0\n", "key 'n': expected an integer >= 1; got 0"),
        ("[hmc]\nL = 1\n", "key 'L': expected an integer >= 2"),
        ('[hmc]\nintegrator = "euler"\n', "key 'integrator': expected one of 'omelyan', "
         "'leapfrog'; got 'euler'"),
        ('[hmc]\ncompression = "zip"\n', "key 'compression': expected one of"),
        ("[hmc]\ntraj_length = true\n", "key 'traj_length': expected a number; got True"),
        ("[hmc]\nseed = -1\n", "key 'seed': expected an integer in [0,"),
        ("[sampel]\nn = 3\n",
         "unknown section [sampel]; expected one of [analyze], [cluster], [compare]"),
        ("[hmc]\ncolour = 3\n", "unknown option 'colour' for 'flowmc hmc'"),
        ("[train]\nsteps = 1.5\n", "[train]: key 'steps': expected an integer; got 1.5"),
        ("[hmc.extra]\nn = 3\n", "[hmc] has a nested table 'extra'"),
        ('[analyze]\nensemble = "x.h5"\n', "'ensemble' is a positional argument"),
        ("n = 3\nn = 4\n", "is not valid TOML"),
    ],
)
def test_toml_values_are_typed(
    tmp_path: Path, capsys: pytest.CaptureFixture, toml: str, expected: str
) -> None:
    out = tmp_path / "e.h5"
    line = _run(tmp_path, capsys, toml, [*HMC, "--out", str(out)])
    assert line.startswith("flowmc hmc: error: --config ") and "cfg.toml" in line, line
    assert expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]  # nothing written


def test_string_false_no_longer_replaces_an_ensemble(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Failed before: ``force = "false"`` counted as true and replaced a 12,000-row file."""
    out = tmp_path / "keep.h5"
    with EnsembleWriter.create(out, lattice_shape=(4, 4), n_chains=1, scalar_names=["a"],
                               action={}, sampler={"name": "x"}) as w:
        w.append(scalars={"a": np.zeros((7, 1))}, configs=np.zeros((7, 1, 4, 4)),
                 state={"i": np.array(1)}, wall_time=0.0)
    _run(tmp_path, capsys, '[hmc]\nforce = "false"\n', [*HMC, "--out", str(out)])
    with open_ensemble(out) as ens:
        assert ens.n == 7


def test_config_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A directory, a missing file or a binary file as --config: one line each.
    Failed before: IsADirectoryError / UnicodeDecodeError tracebacks."""
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    for cfg, why in ((tmp_path, "is a directory"), (tmp_path / "no.toml", "file not found"),
                     (tmp_path / "bin.toml", "is not UTF-8 text")):
        assert main([*HMC, "--out", str(tmp_path / "e.h5"), "--config", str(cfg)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and why in err, err


def test_good_toml_values_and_flag_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('seed = 4\n[hmc]\nL = 4\nm2 = -4\nlam = 8\nn = 5\nflip = true\n'
                   'traj_length = 2\nout = "x.h5"\n[train]\nhidden = [8, 8]\nsteps = 3\n')
    _, commands = build_parser()
    args = parse_with_config(commands["hmc"], ["--config", str(cfg), "--n", "9"], "hmc",
                             commands)
    assert (args.L, args.n, args.flip, args.seed) == (4, 9, True, 4)  # the flag wins
    assert args.traj_length == 2.0 and isinstance(args.traj_length, float)
    assert args.out == Path("x.h5")
    targs = parse_with_config(commands["train"], ["--config", str(cfg)], "train", commands)
    assert targs.hidden == (8, 8) and targs.steps == 3 and targs.L is None


def test_flags_are_checked_the_same_way(capsys: pytest.CaptureFixture) -> None:
    """Failed before: ``flowmc hmc --L 1`` succeeded and ``flowmc analyze`` then died with an
    IndexError; ``--threads -1`` and ``--seed -1`` gave torch tracebacks."""
    for flag, value, expected in (("--L", "1", "expected an integer >= 2"),
                                  ("--threads", "0", "expected an integer >= 1"),
                                  ("--seed", "-1", "expected an integer in [0, "),
                                  ("--n", "2.5", "expected an integer; got '2.5'")):
        with pytest.raises(SystemExit) as info:
            main([*HMC, "--out", "x.h5", flag, value])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"argument {flag}: {expected}" in err, err
    with pytest.raises(ValueError, match="expected an integer >= 3"):
        IntRange(3).check(2)
