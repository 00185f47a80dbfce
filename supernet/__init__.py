"""Hybrid FA/SWA/GDN/KDA supernet: one checkpoint, many speeds."""

from pathlib import Path

# Where the trained demo supernet ships (a delta checkpoint on the SmolLM2 teacher); `supernet serve` defaults here.
DEMO_DIR = Path(__file__).parent / "demo"
