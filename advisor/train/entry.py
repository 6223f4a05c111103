"""Module entry for `accelerate launch -m advisor.train.entry JOB.json OUTPUT_DIR [--events-dir DIR]`.

Every process runs `run_training`; rank 0 writes every event, each rank writes its final `result` (with the
checksum of its trainable weights, so a parent can check the replicas agree) as JSON lines to
`DIR/events-rank<r>.jsonl` (stdout when no directory is given). Exit code 0 on success or cancel, 3 when the plan
was refused, 1 on any other failure (the error is written as an `error` event first).

Stopping: when the file given by `--stop-file` exists, or the process gets SIGTERM (what torchrun forwards when the
launcher is terminated), training stops after the current step with a checkpoint and the result has status
"cancelled" (rank 0 decides; the decision is shared with every rank).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m advisor.train.entry")
    parser.add_argument("job", help="normalized job JSON (advisor.train.normalize_job output)")
    parser.add_argument("output_dir")
    parser.add_argument("--events-dir", default=None)
    parser.add_argument("--resume", default="latest", help="'latest', a checkpoint directory, or 'none'")
    parser.add_argument("--device", default=None)
    parser.add_argument("--stop-file", default=None, help="stop (with a checkpoint) once this file exists")
    args = parser.parse_args(argv)
    stop = {"signal": False}

    def on_sigterm(signum, frame):
        stop["signal"] = True

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)

    def should_stop() -> bool:
        return stop["signal"] or bool(args.stop_file and Path(args.stop_file).exists())

    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    sink = _sink(args.events_dir, rank)

    def write(event: dict) -> None:
        sink.write(json.dumps({**event, "rank": rank}, default=str) + "\n")
        sink.flush()

    from advisor.train import run_training
    from advisor.train.runner import TrainingRefused

    job = json.loads(Path(args.job).read_text())
    resume = None if args.resume in ("none", "") else args.resume
    try:
        result = run_training(job, output_dir=args.output_dir, on_event=write, resume=resume, device=args.device,
                              should_stop=should_stop)
    except TrainingRefused as err:
        write({"type": "error", "error": err.message, "details": err.details, "refused": True})
        return 3
    except Exception as err:  # reported to the parent, then a non-zero exit
        write({"type": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]})
        return 1
    write({"type": "result", **result, **(result.get("distributed") or {})})
    return 0


def _sink(events_dir: str | None, rank: int):
    if not events_dir:
        return sys.stdout
    path = Path(events_dir) / f"events-rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", buffering=1)


if __name__ == "__main__":
    sys.exit(main())
