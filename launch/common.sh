# Sourced by every launcher launch/*.sh right after its usage(): the preamble they share,
# written once. (slurm.sbatch runs as a copy in Slurm's spool directory, so it cannot
# source this; it hands each node over to torchrun.sh, which does.)
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#   launch_config "$@"; shift        # -h/--help, no arguments, CONFIG must exist
# Then: $CONFIG, $PYTHON, `launch_fail MSG` (exit 2 naming the script), `config_sp_size
# "$@"` (parallel.sp_size after the --set overrides) and `supervise CMD...`.

LAUNCHER_NAME=$(basename "$0")
PYTHON=${PYTHON:-python}

launch_fail() {
    echo "$LAUNCHER_NAME: $*" >&2
    exit 2
}

launch_config() {
    if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
    case "$1" in -h|--help) usage; exit 0 ;; esac
    CONFIG=$1
    [[ -f $CONFIG ]] || launch_fail "config $CONFIG not found (relative paths resolve against $PWD)"
}

# Read through seqpar's own loader, so `--set parallel.sp_size=2` counts.
config_sp_size() {
    "$PYTHON" -m seqpar.train.config_io --get parallel.sp_size "$CONFIG" "$@"
}

# SIGTERM/SIGINT: checkpoint, then exit 0; the workers die with the launcher script.
source "$(dirname "${BASH_SOURCE[0]}")/supervise.sh"
