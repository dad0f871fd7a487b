#!/usr/bin/env bash
# A real multi-node SLURM cluster (with accounting, typed GPU GRES) on this machine,
# without systemd: N nodes (default 2), each its own slurmd with its own loopback address.
#
#   bash slurm/local-cluster.sh up [--nodes N]   install the packages if missing, write the
#                                        config, add the node names to /etc/hosts, start
#                                        munged, mariadbd, slurmdbd, slurmctld, one slurmd
#                                        per node
#   bash slurm/local-cluster.sh status   one line per daemon and per node; exit 0 only if
#                                        all run and every node is idle/mixed/allocated
#   bash slurm/local-cluster.sh down     cancel jobs, stop the daemons that `up` started,
#                                        remove the /etc/hosts entries and GPU device files
#
# Nodes n1..nN at 127.0.0.2.., each declaring the host's CPUs and memory. Typed GPUs with
# no GPU behind them (device files with the null device's numbers): n1 has gpu:a100:2, the
# others gpu:v100:1. Partitions: debug (every node, the default), a100 (n1), v100 (the
# others). Jobs see no CUDA: whatever they plan for a GPU type runs on the CPU.
#
# For Debian 12 as root (CI, sandboxes). Files go to the standard places: /etc/slurm,
# /etc/munge, /var/lib/slurm, /var/log/slurm; the pids this script started are kept in
# $LOCAL_SLURM_STATE_DIR (default /run/local-slurm). Measured facts behind each choice:
# docs/local-slurm.md.
#
#   LOCAL_SLURM_TIMEOUT_S   seconds to wait for each daemon to become ready (default 30)
set -euo pipefail

STATE_DIR=${LOCAL_SLURM_STATE_DIR:-/run/local-slurm}
TIMEOUT_S=${LOCAL_SLURM_TIMEOUT_S:-30}
CLUSTER=localcluster
PARTITION=debug
HOST=$(hostname -s)
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
GRES_DIR=/var/lib/slurm/gres          # the GPUs' device files
HOSTS_BEGIN="# local-slurm nodes: begin (slurm/local-cluster.sh; removed by down)"
HOSTS_END="# local-slurm nodes: end"
DBD_CONF=/etc/slurm/slurmdbd.conf
DB_SOCKET=/run/mysqld/mysqld.sock
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
SERVICES=(munged mariadbd slurmdbd slurmctld)   # start order, then one slurmd@NODE a node
NODES=()                                          # n1..nN: from --nodes, else the last `up`

say() { printf '[local-slurm] %s\n' "$*"; }
die() { printf '[local-slurm] error: %s\n' "$*" >&2; exit 1; }

# A daemon is named NAME or, for a node's slurmd, slurmd@NODE (the process is `slurmd`).
process_of() { echo "${1%@*}"; }
node_of() { [[ $1 == *@* ]] && echo "${1#*@}"; }
# The pid file each daemon writes itself, and its log (slurm.conf's %n is the node).
own_pidfile() {
    case $1 in
        munged) echo /run/munge/munged.pid ;;
        mariadbd) echo /run/mysqld/mysqld.pid ;;
        slurmd@*) echo "/run/slurmd-${1#*@}.pid" ;;
        *) echo "/run/$1.pid" ;;
    esac
}
logfile() {
    case $1 in
        munged) echo /var/log/munge/munged.log ;;
        mariadbd) echo /var/log/mysql/error.log ;;
        slurmd@*) echo "/var/log/slurm/slurmd-${1#*@}.log" ;;
        *) echo "/var/log/slurm/$1.log" ;;
    esac
}
daemons() {   # start order; down goes backwards
    local node
    printf '%s\n' "${SERVICES[@]}"
    for node in "${NODES[@]}"; do echo "slurmd@$node"; done
}
# The nodes of the cluster as configured (slurm.conf's NodeName lines).
configured_nodes() {
    [[ -r $CONF ]] && sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF"
}
node_index() { echo "${1#n}"; }                      # n2 -> 2
node_addr() { echo "127.0.0.$(( $(node_index "$1") + 1 ))"; }   # n1 -> 127.0.0.2
node_port() { echo $(( 7820 + $(node_index "$1") )); }           # n1 -> 7821

# True if PID is a live (not zombie) process named NAME. kill -0 is not enough: a killed
# daemon stays a zombie for a while, and a pid file in /run can outlive a reboot of the
# sandbox, its pid reused by something else.
is_daemon() {
    local pid=$1 name=$2 stat comm state
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    comm=${stat#*(}; comm=${comm%)*}
    state=${stat##*) }; state=${state%% *}
    [[ $comm == "$name" && $state != Z && $state != X ]]
}

read_pid() { if [[ -r $1 ]]; then head -n1 "$1" | tr -dc 0-9; fi; }

# Prints the pid of the running daemon NAME (ours first, then whatever its pid file says).
running_pid() {
    local name=$1 pid
    for f in "$STATE_DIR/$name.pid" "$(own_pidfile "$name")"; do
        pid=$(read_pid "$f")
        if [[ -n $pid ]] && is_daemon "$pid" "$(process_of "$name")"; then echo "$pid"; return 0; fi
    done
    return 1
}

# wait_until NAME DESCRIPTION COMMAND...: poll COMMAND until it succeeds, or fail with the log.
wait_until() {
    local name=$1 what=$2 deadline=$((SECONDS + TIMEOUT_S)) log
    shift 2
    log=$(logfile "$name")
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            [[ -r $log ]] && { echo "--- last lines of $log:" >&2; tail -n 15 "$log" >&2; }
            die "$name: $what not reached within ${TIMEOUT_S} s (log: $log)"
        fi
        sleep 0.2
    done
}

# After a daemon forked itself away: wait for its own pid file, check the process, record it.
record_started() {
    local name=$1 pidfile pid="" deadline=$((SECONDS + TIMEOUT_S))
    pidfile=$(own_pidfile "$name")
    while :; do
        pid=$(read_pid "$pidfile")
        if [[ -n $pid ]] && is_daemon "$pid" "$(process_of "$name")"; then break; fi
        if ((SECONDS >= deadline)); then
            local log; log=$(logfile "$name")
            [[ -r $log ]] && { echo "--- last lines of $log:" >&2; tail -n 15 "$log" >&2; }
            die "$name did not start: no live process in $pidfile after ${TIMEOUT_S} s (log: $log)"
        fi
        sleep 0.1
    done
    echo "$pid" > "$STATE_DIR/$name.pid"
    STARTED_PID=$pid
}

# ---------------------------------------------------------------------------- install

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then say "packages: installed already"; return; fi
    [[ $(id -u) == 0 ]] || die "installing ${missing[*]} needs root"
    say "installing ${missing[*]} (apt-get)"
    # Keep postinst scripts from starting daemons: there is no init system to own them.
    local policy=/usr/sbin/policy-rc.d backup=""
    if [[ -e $policy ]]; then backup=$(mktemp); cp -p "$policy" "$backup"; fi
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
    local rc=0 aptlog=/var/log/local-slurm-apt.log
    {
        apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    } > "$aptlog" 2>&1 || rc=$?
    if [[ -n $backup ]]; then mv "$backup" "$policy"; else rm -f "$policy"; fi
    if ((rc != 0)); then
        tail -n 20 "$aptlog" >&2
        die "apt-get failed (exit $rc, log: $aptlog)"
    fi
}

# ----------------------------------------------------------------------------- config

# install_file SRC DEST OWNER MODE: move SRC over DEST if it differs; say which.
install_file() {
    local src=$1 dest=$2 owner=$3 mode=$4
    if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
        rm -f "$src"
    else
        mv "$src" "$dest"
        CONFIG_CHANGED=1
        say "wrote $dest"
    fi
    chown "$owner" "$dest"; chmod "$mode" "$dest"
}

write_config() {
    local hw cpus boards sockets cores threads mem_mb tmp pass="" node nodes_lines="" gres_lines=""
    local first=${NODES[0]} others="" gpu=0 n i type
    mkdir -p /etc/slurm /var/lib/slurm/slurmd /var/lib/slurm/slurmctld /var/log/slurm "$GRES_DIR"
    chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm
    hw=$(slurmd -C | head -n1) || die "slurmd -C failed"
    field() { sed -n "s/.*\\b$1=\\([0-9]*\\).*/\\1/p" <<< "$hw"; }
    cpus=$(field CPUs); boards=$(field Boards); sockets=$(field SocketsPerBoard)
    cores=$(field CoresPerSocket); threads=$(field ThreadsPerCore); mem_mb=$(field RealMemory)
    [[ -n $cpus && -n $mem_mb ]] || die "could not parse 'slurmd -C': $hw"
    mem_mb=$((mem_mb * 95 / 100))

    # Each node: its own address and port (every slurmd binds all addresses), the host's
    # CPUs and memory, typed GPUs whose device files have the null device's numbers
    # (a GPU with no File= leaves the node INVAL).
    for node in "${NODES[@]}"; do
        if [[ $node == "$first" ]]; then n=2; type=a100; else n=1; type=v100; others+="${others:+,}$node"; fi
        nodes_lines+="NodeName=$node NodeHostname=$HOST NodeAddr=$(node_addr "$node") Port=$(node_port "$node") CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem_mb Gres=gpu:$type:$n State=UNKNOWN"$'\n'
        for ((i = 0; i < n; i++)); do
            [[ -c $GRES_DIR/nvidia$gpu ]] || mknod "$GRES_DIR/nvidia$gpu" c 1 3
            gres_lines+="NodeName=$node Name=gpu Type=$type File=$GRES_DIR/nvidia$gpu"$'\n'
            gpu=$((gpu + 1))
        done
    done

    tmp=$(mktemp)
    cat > "$tmp" <<EOF
# Written by slurm/local-cluster.sh: a ${#NODES[@]}-node cluster on one host, with accounting
# and typed GPU GRES (see docs/local-slurm.md).
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job is held (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
# No cgroups in a sandbox.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
GresTypes=gpu
SlurmctldPidFile=$(own_pidfile slurmctld)
# %n: the node a slurmd runs as (slurmd -N NODE)
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd/%n
StateSaveLocation=/var/lib/slurm/slurmctld
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
# Dependents of a failed job are cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
SlurmctldLogFile=$(logfile slurmctld)
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
${nodes_lines}PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=a100 Nodes=$first Default=NO MaxTime=INFINITE State=UP
EOF
    if [[ -n $others ]]; then
        echo "PartitionName=v100 Nodes=$others Default=NO MaxTime=INFINITE State=UP" >> "$tmp"
    fi
    install_file "$tmp" "$CONF" root:root 644
    for node in "${NODES[@]}"; do mkdir -p "/var/lib/slurm/slurmd/$node"; done
    tmp=$(mktemp)
    printf '# Written by slurm/local-cluster.sh: one device file per GPU (no GPU behind it).\n%s' \
        "$gres_lines" > "$tmp"
    install_file "$tmp" "$GRES_CONF" root:root 644

    # Keep the database password across runs: the database user already has it.
    [[ -r $DBD_CONF ]] && pass=$(sed -n 's/^StoragePass=//p' "$DBD_CONF")
    [[ -n $pass ]] || pass=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20)
    DB_PASS=$pass
    tmp=$(mktemp)
    cat > "$tmp" <<EOF
# Written by slurm/local-cluster.sh. Must be owned by SlurmUser, mode 0600.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
PidFile=$(own_pidfile slurmdbd)
LogFile=$(logfile slurmdbd)
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
    install_file "$tmp" "$DBD_CONF" slurm:slurm 600
}

# The node names resolve wherever a job uses them as a host (a rendezvous address from
# SLURM_JOB_NODELIST). /etc/hosts may be a bind mount: rewrite it in place, never rename.
hosts_without_ours() {
    awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' /etc/hosts
}
add_hosts() {
    local tmp node; tmp=$(mktemp)
    hosts_without_ours > "$tmp"
    { echo "$HOSTS_BEGIN"
      for node in "${NODES[@]}"; do echo "$(node_addr "$node") $node"; done
      echo "$HOSTS_END"; } >> "$tmp"
    if ! cmp -s "$tmp" /etc/hosts; then cat "$tmp" > /etc/hosts; say "/etc/hosts: ${NODES[*]}"; fi
    rm -f "$tmp"
}
remove_hosts() {
    local tmp; tmp=$(mktemp)
    hosts_without_ours > "$tmp"
    if ! cmp -s "$tmp" /etc/hosts; then cat "$tmp" > /etc/hosts; say "/etc/hosts: node entries removed"; fi
    rm -f "$tmp"
}

# ----------------------------------------------------------------------------- daemons

prepare_munged() {
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        say "created $key"
    fi
    chown munge:munge "$key"; chmod 0400 "$key"   # else munged: "Keyfile is insecure"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 0755 /run/munge
}
start_munged() { rm -f "$(own_pidfile munged)"; runuser -u munge -- /usr/sbin/munged; }
ready_munged() { munge -n | unmunge; }

prepare_mariadbd() {
    mkdir -p /run/mysqld /var/log/mysql
    chown mysql:mysql /run/mysqld /var/log/mysql
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        say "initialising the database in /var/lib/mysql"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db \
            > /var/log/mysql/install-db.log 2>&1 \
            || die "mariadb-install-db failed (log: /var/log/mysql/install-db.log)"
    fi
}
start_mariadbd() {
    rm -f "$(own_pidfile mariadbd)"
    # Socket only (no TCP port); setsid detaches it from this shell's session.
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --skip-networking \
        --socket="$DB_SOCKET" --pid-file="$(own_pidfile mariadbd)" \
        --log-error="$(logfile mariadbd)" \
        --innodb-buffer-pool-size=1024M --innodb-lock-wait-timeout=900 \
        < /dev/null > /dev/null 2>&1 &
}
ready_mariadbd() { mariadb-admin --socket="$DB_SOCKET" ping; }

setup_database() {
    mariadb --socket="$DB_SOCKET" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() { rm -f "$(own_pidfile slurmdbd)"; /usr/sbin/slurmdbd; }
ready_slurmdbd() { timeout 5 sacctmgr -n show cluster; }

start_slurmctld() { rm -f "$(own_pidfile slurmctld)"; /usr/sbin/slurmctld; }
ready_slurmctld() { timeout 5 scontrol ping | grep -q 'is UP'; }

start_slurmd() { rm -f "$(own_pidfile "slurmd@$1")"; /usr/sbin/slurmd -N "$1"; }
ready_slurmd() { node_ready "$1"; }

node_state() { timeout 5 sinfo -h -n "$1" -o %t 2>/dev/null | head -n1; }
node_ready() { [[ $(node_state "$1") =~ ^(idle|mix|alloc)$ ]]; }
accounting_ready() {
    timeout 5 sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" &&
        timeout 5 sacct -n -X --starttime now
}

# nudge_node NODE WAIT_S: a node that was down before (a killed slurmd, or set down by
# hand) may need one nudge back to service.
# A node whose slurmd was killed under a job stays 'comp' (completing) or 'down' until
# it is back and asked again: ask every 5 s until WAIT_S is up.
nudge_node() {
    local node=$1 deadline=$((SECONDS + $2)) state next=$((SECONDS + 5))
    until node_ready "$node" || ((SECONDS >= deadline)); do sleep 0.2; done
    until node_ready "$node"; do
        state=$(node_state "$node" || true)
        timeout 5 scontrol update nodename="$node" state=resume > /dev/null 2>&1 || true
        say "node $node was '${state:-?}': asked slurmctld to resume it"
        ((SECONDS + 5 < deadline + TIMEOUT_S)) || return 0
        next=$((SECONDS + 5))
        until node_ready "$node" || ((SECONDS >= next)); do sleep 0.2; done
    done
}

# ensure NAME: start the daemon unless it runs already, then wait until it is ready.
# NAME is a service or slurmd@NODE; its functions take the node as their argument.
ensure() {
    local name=$1 pid t0=$SECONDS startlog="$STATE_DIR/$1.start.log" base node
    base=$(process_of "$name"); node=$(node_of "$name" || true)
    if declare -F "prepare_$base" > /dev/null; then "prepare_$base"; fi
    if pid=$(running_pid "$name"); then
        [[ $base == slurmd ]] && nudge_node "$node" 0
        wait_until "$name" "readiness" "ready_$base" $node
        say "$name: running already (pid $pid)"
        return
    fi
    # 9>&-: the daemon must not inherit the lock (the next `up` would wait on it forever).
    # shellcheck disable=SC2086  # $node: no argument for a service
    if ! "start_$base" $node > "$startlog" 2>&1 9>&-; then
        cat "$startlog" >&2
        die "$name failed to start (log: $(logfile "$name"))"
    fi
    record_started "$name"
    [[ $base == slurmd ]] && nudge_node "$node" 5   # a fresh slurmd registers within ~1 s
    wait_until "$name" "readiness" "ready_$base" $node
    say "$name: started (pid $STARTED_PID, ready in $((SECONDS - t0)) s)"
}

# ------------------------------------------------------------------------- commands

cmd_up() {
    local t0=$SECONDS
    [[ $(id -u) == 0 ]] || die "run as root (starts system daemons)"
    getent hosts "$HOST" > /dev/null || say "warning: hostname '$HOST' does not resolve (127.0.0.1 is used)"
    install_packages
    CONFIG_CHANGED=0
    write_config                      # before slurmdbd: sacctmgr and sinfo read slurm.conf
    add_hosts
    if ((CONFIG_CHANGED)) && running_pid slurmctld > /dev/null; then
        say "warning: the config changed while slurmctld runs: run 'down' then 'up' to apply it"
    fi
    ensure munged
    ensure mariadbd
    setup_database > /dev/null || die "could not set up the slurm database user (log: $(logfile mariadbd))"
    ensure slurmdbd
    if ! accounting_ready > /dev/null 2>&1; then
        timeout 10 sacctmgr -i add cluster "$CLUSTER" > /dev/null 2>&1 || true
    fi
    ensure slurmctld
    local node
    for node in "${NODES[@]}"; do ensure "slurmd@$node"; done
    wait_until slurmctld "accounting (sacct)" accounting_ready
    say "up in $((SECONDS - t0)) s: $(timeout 5 sinfo -h -N -o '%N %G %t' | sort -u | paste -sd ',' - | sed 's/,/, /g');" \
        "partition $PARTITION (default); accounting on"
}

# stop NAME: SIGTERM the pid this script recorded, SIGKILL after 10 s; clean pid files.
stop() {
    local name=$1 pid own other proc
    own=$(own_pidfile "$name"); proc=$(process_of "$name")
    pid=$(read_pid "$STATE_DIR/$name.pid")
    if [[ -n $pid ]] && is_daemon "$pid" "$proc"; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while is_daemon "$pid" "$proc" && ((SECONDS < deadline)); do sleep 0.1; done
        if is_daemon "$pid" "$proc"; then
            kill -KILL "$pid" 2>/dev/null || true
            say "$name: stopped (pid $pid, SIGKILL after 10 s)"
        else
            say "$name: stopped (pid $pid)"
        fi
    elif other=$(running_pid "$name"); then
        say "$name: running as pid $other, not started by this script: left alone"
    else
        say "$name: not running"
    fi
    rm -f "$STATE_DIR/$name.pid"
    # A stale pid file (e.g. /run/slurmctld.pid) confuses init scripts and apt-get purge.
    local p; p=$(read_pid "$own")
    if [[ -e $own ]] && ! { [[ -n $p ]] && is_daemon "$p" "$proc"; }; then rm -f "$own"; fi
}

cmd_down() {
    local t0=$SECONDS ids i
    if [[ -n $(read_pid "$STATE_DIR/slurmctld.pid") ]] && running_pid slurmctld > /dev/null; then
        ids=$(timeout 5 squeue -h -o %A 2>/dev/null || true)
        if [[ -n $ids ]]; then
            # shellcheck disable=SC2086
            timeout 5 scancel $ids 2>/dev/null || true
            say "cancelled jobs: ${ids//$'\n'/ }"
        fi
    fi
    local all; mapfile -t all < <(daemons)
    for ((i = ${#all[@]} - 1; i >= 0; i--)); do stop "${all[i]}"; done
    # a single-node cluster's slurmd, started by an earlier version of this script
    [[ -r $STATE_DIR/slurmd.pid ]] && stop slurmd
    remove_hosts
    rm -rf "$GRES_DIR"
    say "down in $((SECONDS - t0)) s"
}

cmd_status() {
    local name pid ok=0 state node gres
    for name in $(daemons); do
        if pid=$(running_pid "$name"); then
            printf '%-12s up (pid %s)\n' "$name" "$pid"
        else
            printf '%-12s down\n' "$name"; ok=1
        fi
    done
    ((${#NODES[@]})) || { printf '%-12s none configured (run up)\n' node; ok=1; }
    for node in "${NODES[@]}"; do
        state=$(node_state "$node" || true)
        gres=$(timeout 5 sinfo -h -n "$node" -o %G 2>/dev/null | head -n1 || true)
        printf '%-12s %s\n' "node $node" \
            "${state:-no answer from slurmctld}${gres:+ ($gres, $(node_addr "$node"))}"
        [[ $state =~ ^(idle|mix|alloc)$ ]] || ok=1
    done
    return $ok
}

usage() { echo "usage: $0 up [--nodes N (1-16, default 2)] | down | status" >&2; exit 2; }

main() {
    local cmd=${1:-} count="" i
    case $cmd in
        up | down | status) shift ;;
        *) usage ;;
    esac
    while (($#)); do
        case $1 in
            --nodes) [[ $cmd == up && ${2:-} =~ ^[0-9]+$ ]] && (($2 >= 1 && $2 <= 16)) || usage
                     count=$2; shift 2 ;;
            --nodes=*) set -- --nodes "${1#--nodes=}" "${@:2}" ;;
            *) usage ;;
        esac
    done
    # The nodes: --nodes N; else, for status and down, those of the config `up` wrote
    # (slurm.conf's NodeName lines); else 2.
    if [[ $cmd != up ]]; then
        mapfile -t NODES < <(configured_nodes | grep -x 'n[0-9]*' || true)
    else
        for ((i = 1; i <= ${count:-2}; i++)); do NODES+=("n$i"); done
    fi
    mkdir -p "$STATE_DIR"
    if [[ $cmd != status ]]; then
        # One up/down at a time.
        exec 9> "$STATE_DIR/lock"
        flock -w 120 9 || die "another '$0' holds $STATE_DIR/lock"
    fi
    "cmd_$cmd"
}

main "$@"
