"""One sub-package per PEFT method."""
