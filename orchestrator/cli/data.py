"""`data synth`, `data check` and `data cache`: the images a run trains on."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from orchestrator.cli import render
from orchestrator.cli.app import data_app, err, out


@data_app.command("synth")
def data_synth(out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the tree into.")],
               subjects: Annotated[int, typer.Option("--subjects", min=1, help="How many subjects.")] = 4,
               shape: Annotated[tuple[int, int, int], typer.Option(
                   "--shape", help="Volume size X Y Z (1 mm voxels).")] = (197, 233, 189),
               seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
               anatomy: Annotated[Literal["phantom", "mni152"], typer.Option(
                   "--anatomy", help="phantom (drawn heads, --shape) | mni152 (the real MNI152 "
                   "2009 template at 2 mm, 98x116x94, fetched from PyPI on first use)")]
               = "phantom") -> None:
    """Write an ATLAS R2.0-style tree of synthetic subjects with stroke-like lesions."""
    # deferred: nibabel and scipy (CLI start-up)
    from orchestrator.data.mni152 import MNI152_SHAPE_VOX, synthesize_mni152
    from orchestrator.data.synth import synthesize_atlas

    with render.counter(err, "synthesising subjects", subjects) as tick:
        if anatomy == "mni152":
            recs = synthesize_mni152(out_dir, subjects, seed, progress=tick)
            shape = MNI152_SHAPE_VOX
        else:
            recs = synthesize_atlas(out_dir, subjects, shape, seed, progress=tick)
    out.print(f"wrote {len(recs)} {anatomy} subjects ({'x'.join(map(str, shape))}) under {out_dir}")


@data_app.command("check")
def data_check(root: Annotated[Path, typer.Argument(help="Data tree to validate.")]) -> None:
    """Validate every image/mask pair; exit 2 if any is broken. Writes nothing."""
    # deferred: nibabel (CLI start-up)
    from orchestrator.data.sources import check_subjects, discover_subjects

    results = check_subjects(discover_subjects(root))
    bad = render.check_table(out, results)
    if bad:
        err.print(f"[red]{bad} of {len(results)} subjects failed the check[/]")
        raise typer.Exit(2)
    out.print(f"[green]all {len(results)} subjects passed[/]")


@data_app.command("cache")
def data_cache(root: Annotated[Path, typer.Argument(help="ATLAS-style data tree.")],
               out_dir: Annotated[Path | None, typer.Option(
                   "--out", help="Cache folder (default: DIR/.cache).")] = None,
               resample_mm: Annotated[float | None, typer.Option(
                   "--resample-mm", help="Resample to this isotropic spacing.")] = None) -> None:
    """Preprocess into an HDF5 cache (RAS, brain crop, normalised, distance maps).

    Unchanged sources are reused; an interrupted run is completed by running it again.
    Use the cache folder as --data.
    """
    from orchestrator.data.cache import build_cache  # deferred: nibabel and scipy (CLI start-up)

    with render.counter(err, "caching subjects", 0) as tick:
        rep = build_cache(root, out_dir, progress=tick, resample_mm=resample_mm)
    out.print(f"cache {rep.out}: {rep.built} built, {rep.reused} reused, {rep.removed} removed "
              f"in {rep.seconds:.1f} s; train with --data {rep.out}")
