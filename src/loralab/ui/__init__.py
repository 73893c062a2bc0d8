"""`loralab ui`: the local web app (config form, job queue, live progress, samples, reviews).

It calls the same library functions as the CLI (`config` for the form's checks, `train.logs` for the
progress) and runs every job as a `loralab` command in its own process (`jobs.py`, `runjob.py`)."""
