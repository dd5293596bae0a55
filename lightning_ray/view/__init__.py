"""The live run page (`lightning-ray view RUN_DIR`, started by `train`): curves, failures and a trajectory browser
over a run directory's files. `app.py` serves it, `run_data.py` reads the run, `calls.py` shapes recorded calls for
display, `charts.py` draws the curves."""
