"""`orchestrator doctor`: what a login node can check before the first job, one line each.

Each check says ok, or what is wrong and the fix: the profile loads and slurm/progressive.sh
reads its `setup:` lines the same way; the setup lines give a Python that imports the
orchestrator (the venv); `sinfo` answers; the partition exists and has GPUs when the
profile asks for them; `sbatch --test-only` accepts the profile's request (account, QoS,
constraint, GPUs, CPUs, memory, time); the data tree is readable, and whether it is the
HDF5 cache training should read.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import REPO_ROOT, ClusterProfile, resolve_cluster
from orchestrator.errors import OrchestratorError

TIMEOUT_S = 20
IMPORT_TIMEOUT_S = 180  # importing torch and MONAI from a network file system is slow
IMPORTS = "import orchestrator, torch, monai, submitit, nibabel, h5py"


@dataclass(frozen=True)
class Check:
    """One line of the report: `ok` or not, what was found, and the fix when not ok."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        head = ("note" if self.fix else "ok  ") if self.ok else "FIX "
        return f"{head} {self.name}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


def _run(cmd: list[str], cwd: Path = REPO_ROOT, timeout_s: float = TIMEOUT_S) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired:
        return 124, f"`{' '.join(cmd[:2])}` did not answer within {timeout_s:g} s"
    except OSError as err:
        return 127, str(err)
    return p.returncode, (p.stdout + p.stderr).strip()


def run_doctor(cluster: str | None, data: Path | None = None) -> list[Check]:
    """Every check, in order; a check that cannot run (no SLURM here) says so and stops
    the SLURM ones."""
    try:
        profile, path = resolve_cluster(cluster)
    except OrchestratorError as err:
        return [Check("profile", False, str(err), "name a profile under envs/clusters/ or a "
                      "YAML file (copy envs/clusters/generic-slurm.yaml)")]
    checks = [Check("profile", True, f"{profile.name} ({path})"), _setup_parse(profile, path),
              _venv(profile, path)]
    sinfo = _sinfo()
    checks.append(sinfo)
    if sinfo.ok and profile.executor == "slurm":
        checks.append(_partition(profile, path))
        if checks[-1].ok:  # sbatch would only refuse the partition again
            checks.append(_test_only(profile, path))
    if data is not None:
        checks.append(_data(data))
    return checks


def _setup_parse(profile: ClusterProfile, path: Path) -> Check:
    """slurm/progressive.sh reads `setup:` with awk (before any Python): same lines?"""
    awk = REPO_ROOT / "slurm" / "profile-setup.awk"
    if shutil.which("awk") is None or not awk.is_file():
        return Check("setup lines", False, "awk or slurm/profile-setup.awk missing",
                     "install awk; slurm/progressive.sh needs it")
    rc, text = _run(["awk", "-f", str(awk), str(path)])
    got = text.splitlines() if rc == 0 and text else []
    if got != list(profile.setup):
        return Check("setup lines", False, f"slurm/progressive.sh would run {got}, the profile "
                     f"says {list(profile.setup)}", f"write `setup:` in {path} as a block list, "
                     "one `  - line` each")
    home = [s for s in profile.setup if "$HOME" in s or "~/" in s]
    return Check("setup lines", True, f"{len(got)} line(s)" + (
        f"; note: {home[0]!r} names a path under $HOME, a path relative to the repository "
        "(jobs start there) moves with it" if home else ""))


def _venv(profile: ClusterProfile, path: Path) -> Check:
    """The setup lines, then the Python jobs use, importing the orchestrator."""
    setup = "\n".join(profile.setup)
    script = (f"set +u -e\n{setup}\nset -u +e\n"  # a setup line that fails is the finding
              'if [ -n "${VIRTUAL_ENV:-}" ]; then PY=python; else PY=.venv/bin/python; fi\n'
              '[ -x "$(command -v "$PY")" ] || { echo "no venv: $PY not found"; exit 3; }\n'
              f'"$PY" -c "import sys; {IMPORTS}; print(sys.prefix)"\n')
    rc, text = _run(["bash", "-c", script], timeout_s=IMPORT_TIMEOUT_S)
    last = text.splitlines()[-1] if text else ""
    if rc == 0:
        return Check("venv", True, f"imports the orchestrator from {last}")
    sources = [s for s in profile.setup if re.match(r"\s*(source|\.)\s", s)]
    if sources:
        target = shlex.split(sources[0])[1] if len(shlex.split(sources[0])) > 1 else "?"
        return Check("venv", False, f"`{sources[0]}` in {path} gives no working Python ({last})",
                     f"create it (`bash setup.sh` makes .venv in the repository) or point the "
                     f"line at an existing venv's bin/activate (now {target})")
    return Check("venv", False, f"no `source .../bin/activate` in {path}'s setup: and {last}",
                 "run `bash setup.sh` in the repository (it makes .venv), or add "
                 "`source .venv/bin/activate` to setup:")


def _sinfo() -> Check:
    if shutil.which("sinfo") is None:
        return Check("sinfo", False, "not installed here", "run doctor on the cluster's login node")
    rc, text = _run(["sinfo", "-h", "-o", "%P"])
    if rc != 0:
        return Check("sinfo", False, text.splitlines()[-1] if text else f"exit {rc}",
                     "SLURM is not answering from here: run doctor on a login node")
    return Check("sinfo", True, f"partitions {', '.join(text.split())}")


def _partition(profile: ClusterProfile, path: Path) -> Check:
    rc, text = _run(["sinfo", "-h", "-o", "%P|%G|%a"])
    rows = [line.split("|") for line in text.splitlines() if line.count("|") == 2]
    names = {r[0].rstrip("*"): r for r in rows}
    want = profile.partition or next((r[0].rstrip("*") for r in rows if r[0].endswith("*")), None)
    if want not in names:
        return Check("partition", False, f"{profile.partition!r} not found (partitions: "
                     f"{', '.join(names)})", f"set `partition:` in {path} to one of them")
    _, gres, avail = names[want]
    if avail != "up":
        return Check("partition", False, f"{want} is {avail}", "pick a partition that is up")
    needs_gpu = profile.gpus_per_node or (profile.gres or "").startswith("gpu")
    if needs_gpu and "gpu" not in gres:
        return Check("partition", False, f"{want} has no GPUs (gres {gres})", f"set `partition:` "
                     f"in {path} to a GPU partition, or gpus_per_node: 0 for CPU jobs")
    return Check("partition", True, f"{want}" + ("" if profile.partition else " (the default)")
                 + f", gres {gres}")


def sbatch_test_args(profile: ClusterProfile) -> list[str]:
    """The profile's resource request as sbatch options (what a stage job asks for)."""
    args = [f"--cpus-per-task={profile.cpus_per_task}", f"--mem={int(profile.mem_gb * 1024)}M",
            f"--time={profile.time_min or 60}", f"--ntasks-per-node={profile.tasks_per_node}",
            f"--nodes={profile.nodes}"]
    for key in ("partition", "account", "qos", "constraint", "gres"):
        if getattr(profile, key):
            args.append(f"--{key}={getattr(profile, key)}")
    if profile.gpus_per_node:
        args.append(f"--gpus-per-node={profile.gpus_per_node}")  # as submit asks (or gres)
    return args


def _test_only(profile: ClusterProfile, path: Path) -> Check:
    args = sbatch_test_args(profile)
    rc, text = _run(["sbatch", "--test-only", *args, "--wrap", "true"])
    if rc != 0:
        why = text.splitlines()[-1] if text else f"exit {rc}"
        return Check("sbatch --test-only", False, f"refused {' '.join(args)}: {why}",
                     f"fix the account/qos/constraint/GPU lines in {path} (`sacctmgr show assoc "
                     "user=$USER` lists your accounts and QoS)")
    return Check("sbatch --test-only", True, f"accepts {' '.join(args)}")


def _data(root: Path) -> Check:
    from orchestrator.data.sources import discover_subjects  # deferred: nibabel (CLI start-up)

    try:
        records = discover_subjects(Path(root))
    except OrchestratorError as err:
        return Check("data", False, str(err), "point --data at an ATLAS-style tree or its cache")
    n = len(records)
    if any(r.cached is not None for r in records):
        return Check("data", True, f"{root}: HDF5 cache of {n} subjects")
    cache = Path(root) / ".cache"
    if cache.is_dir():
        return Check("data", True, f"{root}: {n} raw subjects; a cache exists at {cache}: "
                     f"train with --data {cache}")
    return Check("data", True, f"{root}: {n} raw NIfTI subjects, no cache: every visit "
                 "decompresses a whole volume (~5 samples/s a worker) and workers hold them",
                 f"`orchestrator data cache {root}` once, then --data {cache}")
