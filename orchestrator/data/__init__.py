"""Stroke-lesion data: record types (records), the three layouts (nifti, pngslices,
cachefile) and the chooser between them (sources), the HDF5 cache builder (cache),
distance maps (distance), synthetic phantoms (synth), folds and splits (folds), and the
patch and slice datasets (dataset, slices).

Import from the submodules (`from orchestrator.data.sources import discover_subjects`):
this package imports nothing itself, so that `orchestrator --help` does not pay for
nibabel, scipy or torch.
"""
