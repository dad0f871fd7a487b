"""ATLAS R2.0 data: discovery (atlas), NIfTI loading + validation (volume), synthetic
phantoms (synth), the subject split and random-patch dataset (dataset).

Import from the submodules (`from orchestrator.data.atlas import discover_subjects`):
this package imports nothing itself, so that `orchestrator --help` does not pay for
nibabel, scipy or torch.
"""
