#!/usr/bin/env bash
# The whole Cloud TPU recipe, step by step: bucket and permissions, weights and data into the
# bucket (file by file: this machine needs disk for the largest weight shard only, ~4 GB for
# Qwen2.5-7B, not for the 15 GB of weights), a 5-minute smoke run of configs/debug_cpu.yaml on the real slice, then the paper run
# (on spot VMs through spot_loop.sh, or on the same on-demand VM). `--dry-run` prints every
# command in order and runs nothing. Run it on an always-on machine: its last step, the spot loop,
# watches the run until it is finished (days).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/paper_recipe.sh --bucket gs://BUCKET --name NAME --service-account EMAIL
                              [--type v5p-64] [--config configs/qwen2.5_7b_pacs.yaml]
                              [--model Qwen/Qwen2.5-7B] [--run NAME] [--zone ZONE] [--project PROJECT]
                              [--on-demand] [--queued] [--skip-bucket] [--skip-upload] [--skip-smoke]
                              [--env KEY=VALUE ...] [--env-file FILE] [--dry-run] [--] [key=value ...]

  --bucket           gs://BUCKET for weights, data, runs and checkpoints (created when missing, in
                     the zone's region)
  --service-account  the TPU VMs' identity; gets roles/storage.objectAdmin on the bucket
  --type             TPU slice (default v5p-64: the paper configs' mesh, 32 chips on 8 hosts)
  --config           the paper run's config (default configs/qwen2.5_7b_pacs.yaml)
  --model            Hugging Face model to copy into gs://BUCKET/models/NAME/, one file at a time
                     through a temporary folder here (default Qwen/Qwen2.5-7B; the 3B configs want
                     Qwen/Qwen2.5-3B). Needs `hf` (huggingface_hub) and free disk for one file
                     (~4 GB); a model already there (UPLOAD_COMPLETE) is not copied again
  --run              the run's name under gs://BUCKET/runs/ (default: the config's file name)
  --on-demand        an on-demand VM and train_tpu.sh for the paper run (default: spot VMs and
                     spot_loop.sh, which recreates the VM after each preemption)
  --queued           ask for the VM through a queued resource (waits for capacity)
  --skip-bucket, --skip-upload, --skip-smoke   leave out a step already done
  --env, --env-file  environment variables for the trainer (train_tpu.sh --help): WANDB_API_KEY,
                     HF_TOKEN, LIBTPU_INIT_ARGS, ... (a config with trainer.wandb true also gets
                     wandb installed on the workers)
  key=value          config overrides for the paper run. The recipe sets
                     trainer.compile_cache=gs://BUCKET/compile_cache (every recreated VM reads the
                     compiled programs back instead of compiling again); override it to change
EOF
}

BUCKET="" NAME="" SA="" TYPE=v5p-64 CONFIG=configs/qwen2.5_7b_pacs.yaml MODEL=Qwen/Qwen2.5-7B RUN=""
SPOT=1 QUEUED=0 DO_BUCKET=1 DO_UPLOAD=1 DO_SMOKE=1
OVERRIDES=()
TRAIN_ENV=()
while (($#)); do
  case $1 in
    --bucket) need_value "$@"; BUCKET=${2%/}; shift 2 ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --service-account) need_value "$@"; SA=$2; shift 2 ;;
    --type) need_value "$@"; TYPE=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --model) need_value "$@"; MODEL=$2; shift 2 ;;
    --run) need_value "$@"; RUN=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE_FLAG=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT_FLAG=$2; shift 2 ;;
    --on-demand) SPOT=0; shift ;;
    --queued) QUEUED=1; shift ;;
    --skip-bucket) DO_BUCKET=0; shift ;;
    --skip-upload) DO_UPLOAD=0; shift ;;
    --skip-smoke) DO_SMOKE=0; shift ;;
    --env | --env-file) need_value "$@"; TRAIN_ENV+=("$1" "$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --*) die "unknown argument '$1' (see --help)" ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done

[[ $BUCKET =~ ^gs://[a-z0-9][-a-z0-9_.]{1,61}[a-z0-9]$ ]] || die "--bucket must be gs://BUCKET (a bucket name, no path), got '$BUCKET'"
require_name "$NAME"
require_type "$TYPE"
require_config "$CONFIG"
[[ -n $SA ]] || die "--service-account is required (the TPU VMs' identity, e.g. \
tpu-runner@PROJECT.iam.gserviceaccount.com): it must read the weights and write the run's bucket"
[[ $SA == *@*.iam.gserviceaccount.com || $SA == *@developer.gserviceaccount.com ]] ||
  die "--service-account '$SA' is not a service account e-mail (NAME@PROJECT.iam.gserviceaccount.com)"
case $CONFIG:$TYPE in
  configs/qwen2.5_*:v5p-64) ;;
  configs/qwen2.5_*:*) note "warning: $CONFIG is laid out and checked for v5p-64 (32 chips, mesh.fsdp=-1); \
check it fits $TYPE first: python -m pacs_jax compile --config $CONFIG --topology $TYPE" ;;
esac
RUN=${RUN:-$(basename "$CONFIG" .yaml)}
MODEL_DIR="models/${MODEL##*/}"
require_cloud
REGION=${ZONE_ID%-*}
WHERE_ARGS=(--zone "$ZONE_ID" --project "$PROJECT_ID")
((DRY_RUN)) && WHERE_ARGS+=(--dry-run)
QUEUED_ARG=()
((QUEUED)) && QUEUED_ARG=(--queued)

# 1. The bucket, and the VMs' right to read and write it.
if ((DO_BUCKET)); then
  note "== 1. bucket $BUCKET and its permissions for $SA"
  if ((DRY_RUN)) || ! gcloud storage buckets describe "$BUCKET" --project="$PROJECT_ID" >/dev/null 2>&1; then
    run gcloud storage buckets create "$BUCKET" --project="$PROJECT_ID" --location="$REGION" \
      --uniform-bucket-level-access
  fi
  run gcloud storage buckets add-iam-policy-binding "$BUCKET" \
    "--member=serviceAccount:$SA" --role=roles/storage.objectAdmin
fi

# The model's files, one at a time: from the hub into a temporary folder, into the bucket, deleted.
# This machine needs disk for the largest file only. UPLOAD_COMPLETE marks a finished copy.
upload_model() {
  local dest="$BUCKET/$MODEL_DIR" tmp file
  local python=${PYTHON:-python3}
  local list_files='import sys; from huggingface_hub import list_repo_files; print("\n".join(list_repo_files(sys.argv[1])))'
  if ((!DRY_RUN)) && gcloud storage ls "$dest/UPLOAD_COMPLETE" >/dev/null 2>&1; then
    note "$dest holds $MODEL already (UPLOAD_COMPLETE): not copied again"
    return
  fi
  if ((DRY_RUN)); then
    run "$python" -c "$list_files" "$MODEL"
    run hf download "$MODEL" FILE --local-dir TMP
    run gcloud storage cp TMP/FILE "$dest/FILE"
    note "(dry run: the two commands above run for every FILE of $MODEL, each deleted once copied)"
    run gcloud storage cp - "$dest/UPLOAD_COMPLETE"
    return
  fi
  command -v hf >/dev/null 2>&1 || die "hf (the Hugging Face CLI) is not installed: pip install -U huggingface_hub"
  tmp="$(mktemp -d)"
  "$python" -c "$list_files" "$MODEL" | while IFS= read -r file; do
    [[ -n $file && $file != .gitattributes ]] || continue
    hf download "$MODEL" "$file" --local-dir "$tmp" >/dev/null
    gcloud storage cp "$tmp/$file" "$dest/$file"
    rm -rf "${tmp:?}/$file" "$tmp/.cache"
  done
  rm -rf "$tmp"
  echo "$MODEL" | gcloud storage cp - "$dest/UPLOAD_COMPLETE"
}

# 2. Weights and data into the bucket (the VMs copy them to their disks once each).
if ((DO_UPLOAD)); then
  note "== 2. $MODEL and the evaluation data into $BUCKET"
  upload_model
  if ((DRY_RUN)) || [[ -d $REPO_ROOT/data ]]; then
    run gcloud storage cp -r "$REPO_ROOT/data" "$BUCKET/"
  fi
fi

# 3. A VM, set up, and a 5-minute smoke run of the debug config on it.
CREATE=(bash "$LAUNCH_DIR/create_tpu.sh" --name "$NAME" --type "$TYPE" "${WHERE_ARGS[@]}"
  --service-account "$SA" ${QUEUED_ARG[@]+"${QUEUED_ARG[@]}"})
((SPOT)) && CREATE+=(--spot)
note "== 3. $TYPE VM $NAME, set up, smoke run of configs/debug_cpu.yaml"
if ((DO_SMOKE)); then
  "${CREATE[@]}"
  bash "$LAUNCH_DIR/setup_tpu.sh" --name "$NAME" "${WHERE_ARGS[@]}"
  bash "$LAUNCH_DIR/train_tpu.sh" --name "$NAME" "${WHERE_ARGS[@]}" --config configs/debug_cpu.yaml \
    --run-dir "$BUCKET/runs/smoke-$NAME" --no-sync -- trainer.total_steps=20 trainer.save_every=10 \
    trainer.eval_every=10 sft.steps=100
fi

# 4. The paper run. Its compiled programs go to the bucket, so a recreated VM reads them back.
PAPER_OVERRIDES=("model.path=$BUCKET/$MODEL_DIR" "trainer.compile_cache=$BUCKET/compile_cache"
  ${OVERRIDES[@]+"${OVERRIDES[@]}"})
WANDB_ARG=()
wants_wandb "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} && WANDB_ARG=(--with-wandb)
note "== 4. the paper run: $CONFIG into $BUCKET/runs/$RUN"
if ((SPOT)); then
  ADOPT=()
  ((DO_SMOKE)) && ADOPT=(--adopt) # the smoke run's VM: the loop takes it over
  bash "$LAUNCH_DIR/spot_loop.sh" --name "$NAME" --type "$TYPE" "${WHERE_ARGS[@]}" --config "$CONFIG" \
    --run-dir "$BUCKET/runs/$RUN" --service-account "$SA" ${QUEUED_ARG[@]+"${QUEUED_ARG[@]}"} \
    ${ADOPT[@]+"${ADOPT[@]}"} ${WANDB_ARG[@]+"${WANDB_ARG[@]}"} ${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"} \
    -- "${PAPER_OVERRIDES[@]}"
else
  ((DO_SMOKE)) || "${CREATE[@]}"
  if ((!DO_SMOKE)) || ((${#WANDB_ARG[@]})); then
    bash "$LAUNCH_DIR/setup_tpu.sh" --name "$NAME" "${WHERE_ARGS[@]}" ${WANDB_ARG[@]+"${WANDB_ARG[@]}"}
  fi
  bash "$LAUNCH_DIR/train_tpu.sh" --name "$NAME" "${WHERE_ARGS[@]}" --config "$CONFIG" --no-sync \
    --run-dir "$BUCKET/runs/$RUN" ${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"} -- "${PAPER_OVERRIDES[@]}"
fi
