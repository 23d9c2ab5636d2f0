"""Reports: runs -> report.md and report.html (read-only over what the pipeline wrote)."""
