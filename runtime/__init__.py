"""Executors for compiled steps: in-process (`local`, `local_pipeline`) and on Ray actors, one
per mesh and host (`ray/`); `program.py` is the hand-off they all execute."""
