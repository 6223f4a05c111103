"""The jobs service: training jobs recorded in a database, run one per device in worker processes.

    advisor/jobs/db.py        SQLAlchemy tables (jobs, job_events, datasets); SQLite by default
    advisor/jobs/store.py     reads and transactional changes (a change and its event are one transaction)
    advisor/jobs/service.py   submit / cancel / resume / describe (used by the API and the CLI)
    advisor/jobs/queue.py     the dispatcher (FIFO, one job per device, recovery after a killed server)
    advisor/jobs/worker.py    `python -m advisor.jobs.worker JOB_ID`: runs advisor.train.run_training
    advisor/jobs/forkserver.py  the training stack imported once; a worker process forked per job
    advisor/jobs/datasets.py  upload format check and storage
    advisor/jobs/cli.py       `advisor train`, `advisor jobs list|show|cancel|resume`
"""
