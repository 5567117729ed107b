"""Command-line programs (the root train.py / edit.py and the x2x-* entry points run these)."""
