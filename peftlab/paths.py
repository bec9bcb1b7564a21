"""Where the package's own files live (a foundation module: it imports nothing of peftlab)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout (an editable install) or site-packages
CONF_DIR = ROOT / "conf"                           # Hydra's config groups
PRESET_DIR = Path(__file__).resolve().parent / "models" / "presets"  # architecture configs, no weights
