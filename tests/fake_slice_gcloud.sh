#!/usr/bin/env bash
# gcloud for a simulated TPU slice on this machine (tests/test_launch_slice.py): the slice's N
# workers are N local processes of `python -m pacs_jax train` joined through jax.distributed, each
# with its own home folder as its disk; the bucket is a local folder. Enough of gcloud for
# launch/*.sh and the trainer:
#   compute tpus tpu-vm create|delete|describe|scp|ssh   (one VM, $SLICE/vm; --worker=all or N)
#   storage ls|cp|cat|rsync                              (gs://B/P is $SLICE/buckets/B/P)
# The scenario is played through files in $SLICE: create_failures (how many creates fail with
# gcloud's stockout message), cp_failures (how many copies of gs://B/models/... fail with a 503),
# vm/state (the test writes PREEMPTED to preempt the VM). Every call is logged to $SLICE/calls.
# On a worker the run's folders that a real slice keeps on gs:// (the run directory, the compile
# cache) are this machine's folder of the bucket: jax and Orbax cannot reach a fake gs://, so the
# command's gs://B/runs/ and gs://B/compile_cache become $SLICE/buckets/B/... there. Model and data
# paths stay gs://: the trainer copies them with `gcloud storage cp`, which lands here again.
set -uo pipefail
: "${SLICE:?}" "${SLICE_HOSTS:?}" "${SLICE_DEVICES:?}" "${SLICE_PYTHON:?}"
(IFS=$'\t'; printf '%s\n' "$*") >>"$SLICE/calls"
VM=$SLICE/vm

local_path() { # gs://B/P -> $SLICE/buckets/B/P; anything else unchanged
  if [[ $1 == gs://* ]]; then echo "$SLICE/buckets/${1#gs://}"; else echo "$1"; fi
}

take() { # decrement the counter file $1; succeed when it was above 0
  local n
  n="$(cat "$SLICE/$1" 2>/dev/null || echo 0)"
  ((n > 0)) || return 1
  echo $((n - 1)) >"$SLICE/$1"
}

kill_workers() {
  local i pid
  for ((i = 0; i < SLICE_HOSTS; i++)); do
    pid="$(cat "$VM/worker$i/pacs_jax_run/train.pid" 2>/dev/null)" || continue
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}

free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 30000))
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}

workers_of() { # --worker=all -> 0..N-1
  local flag
  flag="$(grep -o -- '--worker=[^ ]*' <<<"$*" | head -n 1)"
  flag=${flag#--worker=}
  if [[ $flag == all ]]; then seq 0 $((SLICE_HOSTS - 1)); else echo "$flag"; fi
}

ssh_command() {
  local command="" arg i port="" bucket_runs
  for arg in "$@"; do [[ $arg == --command=* ]] && command=${arg#--command=}; done
  [[ "$(cat "$VM/state" 2>/dev/null)" == READY ]] || { echo "ssh: connect to host: Connection refused" >&2; return 255; }
  # The run directory and the compile cache: the bucket's local folder on every worker.
  for bucket_runs in "$SLICE"/buckets/*; do
    local b=${bucket_runs##*/}
    command=${command//gs:\/\/$b\/runs\//$SLICE/buckets/$b/runs/}
    command=${command//gs:\/\/$b\/compile_cache/$SLICE/buckets/$b/compile_cache}
  done
  if [[ $command == *"pip install -q -c constraints.txt"* ]]; then
    # The install: the test's own environment stands in for the worker's venv.
    # shellcheck disable=SC2016
    command='mkdir -p $HOME/pacs_venv/bin && printf "#!/bin/sh\nexec %s \"\$@\"\n" "$SLICE_PYTHON" >$HOME/pacs_venv/bin/python && chmod +x $HOME/pacs_venv/bin/python && echo "jax ok"'
  fi
  [[ $command == *"tpu_worker.sh start"* ]] && port="$(free_port)" # a new coordinator each start
  local outs=() pids=()
  for i in $(workers_of "$@"); do
    outs+=("$(mktemp)")
    (
      cd "$VM/worker$i" || exit 255
      HOME="$VM/worker$i" PACS_JAX_WORKER_ID=$i JAX_PLATFORMS=cpu JAX_DISABLE_MOST_OPTIMIZATIONS=1 \
        XLA_FLAGS="--xla_force_host_platform_device_count=$SLICE_DEVICES" PACS_JAX_SHARED_FS=1 \
        JAX_COORDINATOR_ADDRESS="localhost:${port:-0}" JAX_NUM_PROCESSES=$SLICE_HOSTS JAX_PROCESS_ID=$i \
        bash -c "$command"
    ) >"${outs[-1]}" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for i in "${!pids[@]}"; do
    wait "${pids[i]}" || rc=$?
    cat "${outs[i]}"
    rm -f "${outs[i]}"
  done
  return "$rc"
}

case "$*" in
  "config get-value"*) exit 0 ;;
  "compute tpus tpu-vm describe"*)
    state="$(cat "$VM/state" 2>/dev/null)" || {
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'projects/p/locations/z/nodes/x' was not found" >&2
      exit 1
    }
    echo "$state" ;;
  "compute tpus tpu-vm create"*)
    if take create_failures; then
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.create) {\"code\": 8, \"message\": \"There is no more capacity in the zone \\\"us-west4-a\\\"; you can try in another zone where Cloud TPU Nodes are offered (see https://cloud.google.com/tpu/docs/regions) [EID: 0x5eed]\"}" >&2
      exit 1
    fi
    [[ -e $VM/state ]] && { echo "ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS" >&2; exit 1; }
    for ((i = 0; i < SLICE_HOSTS; i++)); do mkdir -p "$VM/worker$i"; done
    echo READY >"$VM/state" ;;
  "compute tpus tpu-vm delete"*)
    kill_workers
    rm -rf "$VM" ;;
  "compute tpus tpu-vm scp"*)
    [[ "$(cat "$VM/state" 2>/dev/null)" == READY ]] || exit 255
    for i in $(workers_of "$@"); do cp "$5" "$VM/worker$i/${6#*:}"; done ;;
  "compute tpus tpu-vm ssh"*) ssh_command "$@"; exit $? ;;
  "storage ls"*)
    target="$(local_path "${@: -1}")"
    [[ -e $target ]] && { echo "${@: -1}"; exit 0; }
    echo "ERROR: (gcloud.storage.ls) One or more URLs matched no objects." >&2
    exit 1 ;;
  "storage cat"*) cat "$(local_path "$3")" 2>/dev/null || exit 1 ;;
  "storage rsync"*)
    shift 2
    [[ $1 == -r ]] && shift
    mkdir -p "$(local_path "$2")" && cp -r "$(local_path "$1")/." "$(local_path "$2")" ;;
  "storage cp"*)
    shift 2
    [[ $1 == -r ]] && shift
    dest="$(local_path "${@: -1}")"
    sources=("${@:1:$#-1}")
    if [[ ${sources[0]} == gs://*/models/* ]] && take cp_failures; then
      echo "ERROR: (gcloud.storage.cp) HTTPError 503: We encountered an internal error. Please try again." >&2
      exit 1
    fi
    [[ $dest == */ ]] && mkdir -p "$dest"
    for src in "${sources[@]}"; do
      [[ -e "$(local_path "$src")" ]] || {
        echo "ERROR: (gcloud.storage.cp) The following URLs matched no objects or files: $src" >&2
        exit 1
      }
      cp -r "$(local_path "$src")" "$dest" || exit 1
    done ;;
  *) exit 0 ;;
esac
