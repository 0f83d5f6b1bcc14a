# Sourced by launch/*.sh. `supervise CMD...` runs a launcher (torchrun) as a child of
# this script so that the script, which a scheduler or a person signals, decides how the
# job ends:
# - SIGTERM/SIGINT to this script are passed to the workers (the launcher's children);
#   they finish the step, checkpoint and exit 0, and so does the launcher.
# - When the launcher itself was signalled too (Ctrl-C, scancel), torchrun exits 1 by its
#   own logic; the workers' stop report ($SEQPAR_STOP_REPORT, written by rank 0 after the
#   checkpoint) turns that into exit 0. No report (no checkpoint): the failure stands.
# - If this script dies (even SIGKILL), the kernel kills the launcher
#   (seqpar.train.lifecycle sets PR_SET_PDEATHSIG), and the launcher's death kills the
#   workers the same way: no orphan trains on or writes a checkpoint.
supervise() {
    local report child rc signalled=0
    report=$(mktemp "${TMPDIR:-/tmp}/seqpar-stop.XXXXXX")
    rm -f "$report"   # exists only once rank 0 reported a checkpointed stop
    export SEQPAR_STOP_REPORT=$report
    "$PYTHON" -m seqpar.train.lifecycle "$$" -- "$@" &
    child=$!
    _seqpar_forward() {
        signalled=1
        pkill -TERM -P "$child" 2>/dev/null || true
    }
    trap _seqpar_forward TERM INT
    while :; do   # set -e safe: a non-zero wait must not end the script here
        rc=0
        wait "$child" || rc=$?
        kill -0 "$child" 2>/dev/null || break   # otherwise a trap interrupted the wait
    done
    trap - TERM INT
    if [[ -s $report ]]; then
        echo "[launch] $(cat "$report"); exit 0 (launcher status was $rc)" >&2
        rc=0
    elif [[ $signalled == 1 && $rc == 0 ]]; then
        echo "[launch] stopped by a signal; the workers exited cleanly" >&2
    fi
    rm -f "$report"
    return "$rc"
}
