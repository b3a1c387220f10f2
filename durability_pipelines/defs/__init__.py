"""The dg defs folder: one sub-folder per component instance (``consumers/<name>/defs.yaml``)."""
