"""Progressive training orchestrator for 3D stroke lesion segmentation on SLURM."""
__version__ = "0.1.0"
