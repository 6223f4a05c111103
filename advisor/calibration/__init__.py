"""`advisor calibrate`: short probe runs of the fine-tuning methods on this machine's device, a fit of the fast
estimator's per-device terms (overhead, error band, achieved FLOP/s), and a versioned profile in
`profiles/calibration/`. See `calibration/README.md`.

    probes.py   the grid (calibration/grid.yaml) expanded into probes; one probe measured and predicted
    fit.py      least-squares fits and held-out evaluation (pandas / numpy)
    run.py      calibrate(): orchestration and the profile JSON
    cli.py      the `advisor calibrate` command (Typer + rich)
"""

from __future__ import annotations


def calibrate(*args, **kwargs):
    from advisor.calibration.run import calibrate as _calibrate

    return _calibrate(*args, **kwargs)


__all__ = ["calibrate"]
