#!/usr/bin/env bash
# Runs one medgen_jax command as several cooperating JAX processes on this
# machine, the way a cluster runs one per host: each process feeds its own
# slice of every global batch, process 0 writes the workdir's files. On CPUs
# the processes exchange gradients over gloo (TCP). See docs/multihost.md.
#
#   experiments/cluster/local_two_process.sh launch.py \
#       --config=configs/ddpm.py:res=16,runlocal --workdir=/tmp/ddpm_2proc
#
# The arguments are those of `python`: a script (launch.py) and its flags.
# Run it from the repository root. Environment:
#   NUM_PROCESSES  how many processes (default 2)
#   PORT           the coordinator's port on 127.0.0.1 (default: a free one)
#   PYTHON         the interpreter (default: python)
#   LOG_DIR        if set, process i writes its output to LOG_DIR/process_i.log
#                  instead of this terminal
#   GRACE          seconds the others get to end after one process failed,
#                  before they are killed (default 30)
# SIGTERM and SIGINT are passed on to every process as SIGTERM: they all stop
# after the same step and save a checkpoint; rerun the same command to resume.
# Exits with the first non-zero status of a process, else 0.
set -u

if [[ $# -eq 0 ]]; then
  echo "usage: $0 launch.py --config=... --workdir=... (python arguments)" >&2
  exit 2
fi
num=${NUM_PROCESSES:-2}
python=${PYTHON:-python}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
grace=${GRACE:-30}
if [[ -n "${LOG_DIR:-}" ]]; then
  mkdir -p "$LOG_DIR"
fi

pids=()
for ((i = 0; i < num; i++)); do
  if [[ -n "${LOG_DIR:-}" ]]; then
    JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$num" \
      JAX_PROCESS_ID="$i" "$python" "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$num" \
      JAX_PROCESS_ID="$i" "$python" "$@" &
  fi
  pids+=($!)
done

rc=()  # exit status by process, once it ended
signal_running() {
  for i in "${!pids[@]}"; do
    [[ -z "${rc[$i]:-}" ]] && kill "-$1" "${pids[$i]}" 2>/dev/null
  done
}
# Background processes of a script ignore SIGINT, so every stop request
# reaches them as SIGTERM (which launch.py treats like Ctrl-C).
trap 'signal_running TERM' TERM INT

status=0
kill_at=0
finished=0
while ((finished < num)); do
  for i in "${!pids[@]}"; do
    [[ -n "${rc[$i]:-}" ]] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      wait "${pids[$i]}"
      rc[$i]=$?
      finished=$((finished + 1))
      if ((rc[$i] != 0 && status == 0)); then
        status=${rc[$i]}
        # The others may be waiting for it in a collective, where a signal
        # cannot reach them; those still running after GRACE are killed.
        kill_at=$((SECONDS + grace))
      fi
    fi
  done
  if ((kill_at > 0 && SECONDS >= kill_at)); then
    echo "$0: a process exited with status $status; killing the others" >&2
    signal_running KILL
    kill_at=0
  fi
  sleep 0.2 &
  wait $! 2>/dev/null
done
exit "$status"
