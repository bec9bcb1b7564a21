"""``peftlab.runs.load_run``: the public entry point for reading a run back (see peftlab/reporting/runs.py)."""
from peftlab.reporting.runs import is_run_dir, load_run, read_adapter_config

__all__ = ["is_run_dir", "load_run", "read_adapter_config"]
