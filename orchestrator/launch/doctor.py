"""`orchestrator doctor`: what a login node can check before the first job, one line each.

Each check says ok, or what is wrong and the fix: the profile loads and slurm/progressive.sh
reads its `setup:` lines the same way; the setup lines give a Python that imports the
orchestrator (the venv), and for a profile with GPUs its torch is a CUDA build; `sinfo`
answers; the partition exists and has GPUs when the profile asks for them, and `nodes`
nodes that each fit `tasks_per_node` x `cpus_per_task` CPUs and the GPUs; `sbatch
--test-only` accepts the profile's request (account, QoS, constraint, GPUs, CPUs, memory,
time); the GPU inventory, a line per type with its memory and partitions (a type with no
known memory is to fix); the data tree is readable, and whether it is the
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
from orchestrator.launch.inventory import from_profile, gpu_inventory, parse_gres, wants_gpus

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
    venv, torch_build = _venv(profile, path)
    checks = [Check("profile", True, f"{profile.name} ({path})"), _setup_parse(profile, path), venv]
    if torch_build is not None:
        checks.append(_torch_build(profile, path, torch_build))
    sinfo = _sinfo()
    checks.append(sinfo)
    if sinfo.ok and profile.executor == "slurm":
        checks.append(_partition(profile, path))
        if checks[-1].ok:
            checks.append(_nodes(profile, path))
        if checks[-1].ok:  # sbatch would only refuse the partition or the shape again
            checks.append(_test_only(profile, path))
    checks += _gpu_types(profile, path, sinfo.ok)
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


def _venv(profile: ClusterProfile, path: Path) -> tuple[Check, tuple[str, str, str] | None]:
    """The setup lines, then the Python jobs use, importing the orchestrator; with it,
    (venv, torch's version, its CUDA build or "None") when it imports."""
    setup = "\n".join(profile.setup)
    script = (f"set +u -e\n{setup}\nset -u +e\n"  # a setup line that fails is the finding
              'if [ -n "${VIRTUAL_ENV:-}" ]; then PY=python; else PY=.venv/bin/python; fi\n'
              '[ -x "$(command -v "$PY")" ] || { echo "no venv: $PY not found"; exit 3; }\n'
              f'"$PY" -c "import sys; {IMPORTS}; '
              "print(sys.prefix, torch.__version__, torch.version.cuda, sep='|')\"\n")
    rc, text = _run(["bash", "-c", script], timeout_s=IMPORT_TIMEOUT_S)
    last = text.splitlines()[-1] if text else ""
    found = [line for line in text.splitlines() if line.count("|") == 2]  # stderr comes after
    if rc == 0 and found:
        prefix, version, cuda = found[-1].split("|")
        return Check("venv", True, f"imports the orchestrator from {prefix}"), (prefix, version, cuda)
    return _no_venv(profile, path, last), None


def _no_venv(profile: ClusterProfile, path: Path, last: str) -> Check:
    sources = [s for s in profile.setup if re.match(r"\s*(source|\.)\s", s)]
    if sources:
        target = shlex.split(sources[0])[1] if len(shlex.split(sources[0])) > 1 else "?"
        return Check("venv", False, f"`{sources[0]}` in {path} gives no working Python ({last})",
                     f"create it (`bash setup.sh` makes .venv in the repository) or point the "
                     f"line at an existing venv's bin/activate (now {target})")
    return Check("venv", False, f"no `source .../bin/activate` in {path}'s setup: and {last}",
                 "run `bash setup.sh` in the repository (it makes .venv), or add "
                 "`source .venv/bin/activate` to setup:")


def _torch_build(profile: ClusterProfile, path: Path, build: tuple[str, str, str]) -> Check:
    """For a profile with GPUs, the venv's torch must be a CUDA build: a CPU-only one sees
    no GPU on any node (a plan for CUDA then refuses to start). Checked without a GPU."""
    prefix, version, cuda = build
    if cuda not in ("", "None"):
        return Check("torch build", True, f"torch {version}, CUDA {cuda} build ({prefix})")
    if not wants_gpus(profile) or profile.train_device == "cpu":
        why = "trains on the CPU (train_device: cpu)" if wants_gpus(profile) else "asks for no GPU"
        return Check("torch build", True, f"torch {version}, CPU-only build ({prefix}); "
                     f"{profile.name} {why}")
    return Check("torch build", False, f"torch {version} in {prefix} is a CPU-only build "
                 f"(torch.version.cuda is None) but {path} asks for GPUs: it sees no GPU on any "
                 "node", "install a CUDA build there: `TORCH_SPEC=torch bash setup.sh` (pip's "
                 "default Linux wheel is a CUDA build), or pip install torch from a CUDA index "
                 "URL of https://pytorch.org/get-started")


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
    names: dict[str, list[str]] = {}
    for part, gres, avail in rows:  # a row per GRES of the partition's nodes: join them
        have = names.setdefault(part.rstrip("*"), [part, "", avail])
        have[1] = ",".join(g for g in (have[1], gres) if g and g != "(null)") or gres
    want = profile.partition or next((r[0].rstrip("*") for r in rows if r[0].endswith("*")), None)
    if want not in names:
        return Check("partition", False, f"{profile.partition!r} not found (partitions: "
                     f"{', '.join(names)})", f"set `partition:` in {path} to one of them")
    _, gres, avail = names[want]
    if avail != "up":
        return Check("partition", False, f"{want} is {avail}", "pick a partition that is up")
    if wants_gpus(profile) and "gpu" not in gres:
        return Check("partition", False, f"{want} has no GPUs (gres {gres})", f"set `partition:` "
                     f"in {path} to a GPU partition, or gpus_per_node: 0 for CPU jobs")
    return Check("partition", True, f"{want}" + ("" if profile.partition else " (the default)")
                 + f", gres {gres}")


def _gres_gpus(gres: str, gpu_type: str | None = None) -> int:
    """GPUs in a sinfo GRES field (`gpu:a100:2(S:0-1),gpu:v100:1`), of `gpu_type` if given."""
    return sum(n for t, n in parse_gres(gres) if gpu_type is None or t == gpu_type)


def _gpu_request(profile: ClusterProfile) -> tuple[int, str | None]:
    """(GPUs per node, GPU type or None) a stage job asks for."""
    (gres_type, gres_n), *_ = parse_gres(profile.gres or "") or [(None, 0)]
    return max(profile.gpus_per_node, gres_n), gres_type


def _gpu_types(profile: ClusterProfile, path: Path, sinfo_ok: bool) -> list[Check]:
    """The inventory, a line per GPU type: its memory and where it is; a type with no known
    memory (or a card sold in two sizes) asks for it in the profile's `gpu_types:`."""
    inv = gpu_inventory(profile) if sinfo_ok else from_profile(profile)
    checks = []
    for gpu_type in inv.types:
        pools = [p for p in inv.pools if p.gpu_type == gpu_type]
        mem = pools[0].memory
        where = "; ".join(p.where() for p in pools)
        if mem is None:
            checks.append(Check(f"gpu {gpu_type}", False, f"memory unknown ({inv.source}): {where}",
                                f"add `gpu_types: {{{gpu_type}: GB}}` to {path}"))
            continue
        fix = (f"if yours have more, say so in {path}: `gpu_types: {{{gpu_type}: GB}}`"
               if "the smaller" in mem.source else "")
        checks.append(Check(f"gpu {gpu_type}", True, f"{mem.describe()} ({inv.source}): {where}", fix))
    if inv.untyped:
        checks.append(Check("gpus", True, f"partition(s) {', '.join(inv.untyped)} have GPUs of no "
                            "type (gres gpu:N)", "plans there use the profile's gpu_mem_gb"))
    if not checks and wants_gpus(profile):
        checks.append(Check("gpus", True, f"no GPU type known ({inv.source})",
                            f"name the types in {path} (`gres: gpu:TYPE:N` or `gpu_types:`) "
                            "to plan per type"))
    return checks


def _nodes(profile: ClusterProfile, path: Path) -> Check:
    """Does the partition have `nodes` nodes, each with CPUs for tasks_per_node x
    cpus_per_task and the GPUs asked for? (sbatch --test-only only says "Requested node
    configuration is not available".)"""
    part = profile.partition or _default_partition()
    rc, text = _run(["sinfo", "-h", "-N", "-p", part or "", "-o", "%N|%c|%G"])
    shapes = {r[0]: r for r in (line.split("|") for line in text.splitlines()) if len(r) == 3}
    cpus = profile.tasks_per_node * profile.cpus_per_task
    gpus, gpu_type = _gpu_request(profile)
    fit = [n for n, c, g in shapes.values()
           if c.isdigit() and int(c) >= cpus and _gres_gpus(g, gpu_type) >= gpus]
    want = (f"{profile.nodes} node(s) x {profile.tasks_per_node} task(s) x "
            f"{profile.cpus_per_task} CPU(s)" + (f", {gpus} {gpu_type or 'GPU'}(s) a node" if gpus else ""))
    if rc == 0 and len(fit) >= profile.nodes:
        return Check("nodes", True, f"{want}: {len(fit)} of {part}'s {len(shapes)} node(s) fit")
    have = "; ".join(f"{n}: {c} CPUs, gres {g}" for n, c, g in shapes.values()) or text or "none"
    return Check("nodes", False, f"{path} asks {want}, partition {part} has {len(fit)} node(s) "
                 f"that fit ({have})", f"set nodes: at most {len(fit) or 1} and tasks_per_node x "
                 f"cpus_per_task at most a node's CPUs in {path}, or pick a bigger partition")


def _default_partition() -> str | None:
    rc, text = _run(["sinfo", "-h", "-o", "%P"])
    return next((p.rstrip("*") for p in text.split() if p.endswith("*")), None)


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
