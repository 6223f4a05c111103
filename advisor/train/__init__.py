"""The embedded trainer: train a plan (any of the 12 methods) on the user's data on the device present.

    from advisor.train import run_training, normalize_job, load_trained, TrainingRefused

    job = normalize_job({"model": "path/to/model", "method": "lora", "config": {...},
                         "dataset": {"path": "data/train.jsonl", "format": "auto"}})
    result = run_training(job, output_dir="runs/one", on_event=print)
    model, tokenizer = load_trained("runs/one")

`run_training(job, *, output_dir, on_event=None, should_stop=None, resume="latest", device=None) -> dict`
streams events (start, step, eval, checkpoint, oom_retry, log) to `on_event`, stops with a checkpoint when
`should_stop()` is true (status "cancelled"), resumes from the newest `checkpoint-<step>/` by default, and
returns {"status", "step", "total_steps", "output_dir", "metrics", "predicted", "measured", "oom_retries",
"truncated"}. It raises `TrainingRefused` (a ValueError with `.details`) when the plan cannot fit the device even
at micro-batch 1 with gradient checkpointing.
"""



def __getattr__(name):  # torch/transformers are imported only when training is actually used
    if name == "resolve_data_path":
        from advisor.train.data import resolve_data_path

        return resolve_data_path
    if name == "normalize_job":
        from advisor.train.job import normalize_job

        return normalize_job
    if name in ("run_training", "TrainingRefused"):
        from advisor.train import runner

        return getattr(runner, name)
    if name == "load_trained":
        from advisor.train.artifacts import load_trained

        return load_trained
    raise AttributeError(name)


__all__ = ["TrainingRefused", "load_trained", "normalize_job", "resolve_data_path", "run_training"]
