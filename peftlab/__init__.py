"""peftlab: compare parameter-efficient fine-tuning methods on equal footing."""
import os

# Offline by default: nothing downloads at run time unless the user opts in.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
