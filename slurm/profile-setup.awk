# Print a cluster profile's `setup:` lines (envs/clusters/*.yaml), one shell line each,
# without Python: slurm/progressive.sh runs them before anything else (module load, venv).
# Reads the block form only (`setup:` then `  - line` items, optionally quoted);
# `orchestrator doctor` checks that this reading matches the YAML parser's.
/^setup:[[:space:]]*(#.*)?$/ { on = 1; next }
on && /^[[:space:]]*-[[:space:]]/ {
    sub(/^[[:space:]]*-[[:space:]]+/, "")
    sub(/[[:space:]]+$/, "")
    if ($0 ~ /^".*"$/ || $0 ~ /^'.*'$/) $0 = substr($0, 2, length($0) - 2)
    print
    next
}
on && /^[[:space:]]*(#.*)?$/ { next }
on { exit }
