"""The cluster's GPUs by type: where each type is, how many, and how much memory it has.

Where `sinfo` answers, the inventory is the cluster's: one pool per (GPU type, partition)
from each node's GRES (`gpu:TYPE:N`), with the pool's nodes, their states and the
partition's time limit. Elsewhere (a laptop) it is the profile's: its `gpu_types:` that
name a partition, and the types its `gres:` lines ask for. A type's memory comes from the
profile's `gpu_types:` table (sites name types freely: `a100_80g`), else from a size in
its name (`a100-sxm4-80gb`), else from the built-in table of common NVIDIA cards below,
which takes the smaller size of a card sold in two (V100 16/32, A100 40/80) and says so.
A type with no known memory is an error that asks for it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from orchestrator.config import ClusterProfile
from orchestrator.errors import ConfigError
from orchestrator.plan_facts import GpuOption

SINFO_TIMEOUT_S = 20

# GB of memory by the type names sites give common NVIDIA cards; where a card is sold in
# two sizes, the smaller (a plan for it fits the larger too) and the other in the note.
BUILT_IN_GB: dict[str, float] = {
    "p100": 16, "t4": 16, "v100": 16, "v100s": 32, "rtx2080ti": 11, "rtx3090": 24,
    "rtx4090": 24, "rtx6000": 24, "rtx8000": 48, "a4000": 16, "a5000": 24, "a6000": 48,
    "a10": 24, "a30": 24, "a40": 48, "a100": 40, "l4": 24, "l40": 48, "l40s": 48,
    "h100": 80, "h100nvl": 94, "gh200": 96, "h200": 141, "b200": 180,
}
TWO_SIZES = {"v100": "16 or 32 GB", "a100": "40 or 80 GB", "p100": "12 or 16 GB",
             "h100": "80 GB (SXM, PCIe) or 94 GB (NVL)"}
_SIZE_IN_NAME = re.compile(r"(?<![0-9])(\d{2,3})\s*g(?:b)?(?![a-z0-9])")
_VENDOR = re.compile(r"^(nvidia|tesla|geforce|quadro)[-_ ]*")


@dataclass(frozen=True)
class GpuMemory:
    """A type's memory and where it came from (the profile, its name, the built-in table)."""

    gb: float
    source: str

    def describe(self) -> str:
        return f"{self.gb:g} GB, {self.source}"


def type_memory(gpu_type: str, profile: ClusterProfile) -> GpuMemory | None:
    """`gpu_type`'s memory: the profile's table, a size in the name, the built-in table."""
    for name, spec in profile.gpu_types.items():
        if name.lower() == gpu_type.lower():
            return GpuMemory(spec.mem_gb, "profile")
    key = _VENDOR.sub("", gpu_type.lower())
    if m := _SIZE_IN_NAME.search(key):
        return GpuMemory(float(m.group(1)), "from its name")
    compact = re.sub(r"[-_ ]", "", key)
    # the longest built-in name the type starts with: `a100_sxm4` is an a100, `l40s` not an l40
    known = sorted((k for k in BUILT_IN_GB if compact.startswith(k)), key=len, reverse=True)
    if not known:
        return None
    base = known[0]
    note = f"built-in; {base} comes with {TWO_SIZES[base]}, taken as the smaller" \
        if base in TWO_SIZES else "built-in"
    return GpuMemory(BUILT_IN_GB[base], note)


@dataclass(frozen=True)
class GpuPool:
    """The GPUs of one type in one partition."""

    gpu_type: str
    partition: str
    gpus_per_node: int  # the fewest of the pool's nodes have (a job asks per node)
    nodes: tuple[str, ...]
    states: tuple[str, ...]  # each node's sinfo state, e.g. idle, mix, alloc, drain, down*
    time_limit: str  # sinfo's, e.g. 2-00:00:00 or infinite; "" from the profile
    memory: GpuMemory | None

    @property
    def usable_nodes(self) -> int:
        """Nodes that take jobs: not down, drained or failing."""
        return sum(not re.match(r"(down|drain|drng|fail|maint|inval|unk|npc)", s)
                   for s in self.states)

    @property
    def idle_gpus(self) -> int:
        return self.gpus_per_node * sum(s.rstrip("*~#!%$@^-") == "idle" for s in self.states)

    def where(self) -> str:
        """Partition, GPUs a node, nodes, how many usable and idle, time limit."""
        where = (f"partition {self.partition}, {self.gpus_per_node} a node on "
                 f"{len(self.nodes)} node(s)" + (f" ({', '.join(self.nodes)})" if self.nodes else ""))
        if self.states:
            where += f", {self.usable_nodes} usable, {self.idle_gpus} GPU(s) idle"
        if self.time_limit:
            where += f", time limit {self.time_limit}"
        return where

    def describe(self) -> str:
        mem = self.memory.describe() if self.memory else "memory unknown"
        return f"{self.gpu_type} ({mem}): {self.where()}"


@dataclass(frozen=True)
class Inventory:
    """Every GPU pool, from `sinfo` or from the profile, and the GPUs no type names."""

    source: str  # "sinfo" or "profile"
    pools: tuple[GpuPool, ...]
    untyped: tuple[str, ...] = field(default=())  # partitions with GPUs of no type (gpu:N)

    @property
    def types(self) -> list[str]:
        return sorted({p.gpu_type for p in self.pools}, key=lambda t: (self.memory(t) or 0, t))

    def memory(self, gpu_type: str) -> float | None:
        mem = next((p.memory for p in self.pools if p.gpu_type == gpu_type), None)
        return mem.gb if mem else None

    def unknown(self) -> list[str]:
        return sorted({p.gpu_type for p in self.pools if p.memory is None})

    def require_memory(self, profile_path: Path | str) -> None:
        """Raises ConfigError: one line asking for each type whose memory is unknown."""
        if unknown := self.unknown():
            where = {t: sorted({p.partition for p in self.pools if p.gpu_type == t}) for t in unknown}
            what = "; ".join(f"{t} (partition {', '.join(where[t])})" for t in unknown)
            example = ", ".join(f"{t}: GB" for t in unknown)
            raise ConfigError(f"{profile_path}: gpu_types: no known memory for GPU type(s) {what}, "
                              f"from {self.source}; expected their memory in GB: add "
                              f"`gpu_types: {{{example}}}` to the profile")


    def pool_for(self, gpu_type: str, profile: ClusterProfile) -> GpuPool:
        """The pool a stage on `gpu_type` is sent to: the partition the profile's
        `gpu_types:` names, else the profile's partition, else a partition of this type
        alone, the one with the most idle GPUs first."""
        pools = [p for p in self.pools if p.gpu_type == gpu_type]
        named = profile.gpu_types.get(gpu_type)
        mixed = {p.partition for p in self.pools if p.gpu_type != gpu_type}
        return min(pools, key=lambda p: (
            not (named and named.partition == p.partition), p.partition != profile.partition,
            p.partition in mixed, -p.idle_gpus, p.partition))

    def options(self, profile: ClusterProfile, ask_start: bool = True) -> list[GpuOption]:
        """Each type as a planning option, on its pool (`pool_for`), with its expected
        start where `sbatch --test-only` answers (`ask_start`)."""
        out = []
        for gpu_type in self.types:
            pool, gb = self.pool_for(gpu_type, profile), self.memory(gpu_type)
            assert gb is not None, "require_memory first"
            start = expected_start_s(pool.partition, gpu_type) if ask_start else None
            out.append(GpuOption(gpu_type, gb, None if pool.partition == "(the default)"
                                 else pool.partition, pool.gpus_per_node, pool.idle_gpus, start))
        return out


def wants_gpus(profile: ClusterProfile) -> bool:
    """Whether the profile's jobs ask for GPUs (or name GPU types)."""
    return bool(profile.gpus_per_node or profile.gpu_types) or (profile.gres or "").startswith("gpu") \
        or any((s.gres or "").startswith("gpu") or s.gpus_per_node or s.gpu_type
               for s in profile.stages.values())


_START = re.compile(r"to start at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)")


def expected_start_s(partition: str | None, gpu_type: str, timeout_s: float = 10) -> float | None:
    """Seconds until a one-GPU job of `gpu_type` would start (`sbatch --test-only`); None
    where sbatch is missing or does not say."""
    if shutil.which("sbatch") is None:
        return None
    cmd = ["sbatch", "--test-only", f"--gres=gpu:{gpu_type}:1", "--wrap", "true"]
    if partition and partition != "(the default)":
        cmd.insert(2, f"--partition={partition}")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (subprocess.TimeoutExpired, OSError):
        return None
    m = _START.search(res.stdout + res.stderr)
    if res.returncode != 0 or m is None:
        return None
    return max(0.0, datetime.fromisoformat(m.group(1)).timestamp() - time.time())


def parse_gres(gres: str) -> list[tuple[str | None, int]]:
    """(type or None, count) of each GPU item of a GRES field (`gpu:a100:2(S:0-1),gpu:1`)."""
    out = []
    for item in gres.split(","):
        parts = item.split("(")[0].strip().split(":")
        if parts[0] != "gpu" or len(parts) < 2 or not parts[-1].isdigit():
            continue
        out.append((parts[1] if len(parts) == 3 else None, int(parts[-1])))
    return out


def sinfo_rows(timeout_s: float = SINFO_TIMEOUT_S) -> list[list[str]] | None:
    """One row per (node, partition): node, partition, GRES, state, time limit; None where
    `sinfo` is not installed or does not answer."""
    if shutil.which("sinfo") is None:
        return None
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%G|%t|%l"], capture_output=True,
                             text=True, timeout=timeout_s)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if res.returncode != 0:
        return None
    return [r for r in (line.split("|") for line in res.stdout.splitlines()) if len(r) == 5]


def from_sinfo(rows: list[list[str]], profile: ClusterProfile) -> Inventory:
    """The pools of `sinfo -N` rows (node|partition|gres|state|timelimit)."""
    found: dict[tuple[str, str], dict] = {}
    untyped: set[str] = set()
    for node, part, gres, state, limit in rows:
        part = part.rstrip("*")
        for gpu_type, n in parse_gres(gres):
            if gpu_type is None:
                untyped.add(part)
                continue
            pool = found.setdefault((gpu_type, part), {"nodes": {}, "limit": limit})
            pool["nodes"][node] = (n, state)
    pools = [GpuPool(t, part, min(n for n, _ in v["nodes"].values()), tuple(sorted(v["nodes"])),
                     tuple(v["nodes"][k][1] for k in sorted(v["nodes"])), v["limit"],
                     type_memory(t, profile))
             for (t, part), v in sorted(found.items())]
    return Inventory("sinfo", tuple(pools), tuple(sorted(untyped)))


def from_profile(profile: ClusterProfile) -> Inventory:
    """The pools a profile names: its `gpu_types:` with a partition, and the typed `gres:`
    of its top level and its stages (on the partition each names, else the profile's)."""
    pools: dict[tuple[str, str], GpuPool] = {}
    for name, spec in profile.gpu_types.items():
        if spec.partition:
            pools[(name, spec.partition)] = GpuPool(name, spec.partition, spec.gpus_per_node, (),
                                                    (), "", type_memory(name, profile))
    asks = [(profile.gres, profile.partition)] + [
        (s.gres or profile.gres, s.partition or profile.partition) for s in profile.stages.values()]
    for gres, part in asks:
        for gpu_type, n in parse_gres(gres or ""):
            if gpu_type is not None and not any(t == gpu_type for t, _ in pools):
                where = part or "(the default)"
                pools[(gpu_type, where)] = GpuPool(gpu_type, where, n, (), (), "",
                                                   type_memory(gpu_type, profile))
    return Inventory("profile", tuple(pools[k] for k in sorted(pools)))


def gpu_inventory(profile: ClusterProfile) -> Inventory:
    """The cluster's inventory where `sinfo` answers, else the profile's."""
    rows = sinfo_rows()
    return from_sinfo(rows, profile) if rows is not None else from_profile(profile)
