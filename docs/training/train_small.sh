#!/usr/bin/env bash
# Train a CaLID model (the VAE, then the interpolation denoiser) within fixed time budgets, and
# score it on the held-out subjects: the recipe of docs/training/README.md in one command.
#
#   DATA=acdc-small.npz OUT=runs/small VAL_SUBJECTS=acdc VAE_MINUTES=60 LDM_MINUTES=120 bash docs/training/train_small.sh
#
# DATA        a `calid pack` file or a folder of cines (required)
# OUT         the run folder (required); run again with the same OUT, each stage resumes from
#             its last checkpoint with its own options, for the new time budget (the VAE only
#             until the denoiser has started: the denoiser learns that VAE's latents)
# VAE_MINUTES, LDM_MINUTES   time budgets (default 60, 120)
# CONFIG      model size (default small)
# VAL_SUBJECTS  held-out subjects, never trained on, comma-separated (default: a random 15 % of
#             the subjects, recorded in the model files); VAL_SUBJECTS=acdc holds out the 13 ACDC
#             subjects of docs/training (patient011, 017, 019 and 061-070)
# EVAL_DATA   cines to score the model on (task 1 of calid evaluate, on the subjects the model
#             held out), with EVAL_LABELS their label folder (ACDC layout); left out, the evaluation is skipped
# VAE_ARGS, LDM_ARGS   more options for each stage, also when resuming (e.g. "--steps 40000")
# CALID       how to call calid (default: calid); NPROC > 1 trains on that many GPUs (torchrun)
# CALID_LPIPS_WEIGHTS  a local copy of the LPIPS AlexNet weights, on a machine without internet
set -euo pipefail

: "${DATA:?set DATA to a calid pack file or a folder of cines}"
: "${OUT:?set OUT to the run folder}"
VAE_MINUTES=${VAE_MINUTES:-60}
LDM_MINUTES=${LDM_MINUTES:-120}
CONFIG=${CONFIG:-small}
ACDC_VAL_SUBJECTS=patient011,patient017,patient019,patient061,patient062,patient063,patient064,patient065,patient066,patient067,patient068,patient069,patient070
VAL_SUBJECTS=${VAL_SUBJECTS:-}
if [ "$VAL_SUBJECTS" = acdc ]; then VAL_SUBJECTS=$ACDC_VAL_SUBJECTS; fi
read -r -a CALID_COMMAND <<< "${CALID:-calid}"
NPROC=${NPROC:-1}
read -r -a VAE_EXTRA <<< "${VAE_ARGS:-}"
read -r -a LDM_EXTRA <<< "${LDM_ARGS:-}"

TRAINER=("${CALID_COMMAND[@]}")
if [ "$NPROC" -gt 1 ]; then
    TRAINER=(torchrun --standalone --nproc_per_node "$NPROC" -m calid)
fi
SPLIT=()
if [ -n "$VAL_SUBJECTS" ]; then
    SPLIT=(--val-subjects "$VAL_SUBJECTS")
fi

train() {  # train STAGE FOLDER MINUTES EXTRA-OPTIONS-NAME NEW-RUN-OPTIONS...
    local stage=$1 folder=$2 minutes=$3
    local -n extra=$4
    shift 4
    if [ -f "$folder/checkpoints/last.safetensors" ]; then
        # The run's own options come from its checkpoint; the time budget and the extras are new.
        "${TRAINER[@]}" train "$stage" --data "$DATA" --out "$folder" --resume --time-limit "$minutes" ${extra[@]+"${extra[@]}"}
    else
        local fresh=()
        if [ ! -f "$folder/model.safetensors" ] && [ ! -f "$folder/best.safetensors" ] \
            && { [ -f "$folder/log.csv" ] || [ -f "$folder/validation.csv" ]; }; then
            # Only the logs of a run stopped (killed) before its first checkpoint: nothing to resume or keep,
            # so it starts again. Model files without a checkpoint are left for the user to decide on.
            echo "$folder holds the logs of a run with no checkpoint to resume: starting it again"
            fresh=(--overwrite)
        fi
        "${TRAINER[@]}" train "$stage" --data "$DATA" --out "$folder" --config "$CONFIG" ${SPLIT[@]+"${SPLIT[@]}"} \
            --transposes --time-limit "$minutes" ${fresh[@]+"${fresh[@]}"} "$@" ${extra[@]+"${extra[@]}"}
    fi
}

if [ -f "$OUT/ldm/checkpoints/last.safetensors" ]; then
    # The denoiser learns the latents of one autoencoder: once it has started, the VAE stays as it is.
    echo "the denoiser in $OUT/ldm has started on $OUT/vae/best.safetensors: the VAE is not trained further"
else
    train vae "$OUT/vae" "$VAE_MINUTES" VAE_EXTRA --batch-size 64 --validate-every 500 --checkpoint-every 500
fi
train ldm "$OUT/ldm" "$LDM_MINUTES" LDM_EXTRA --vae "$OUT/vae/best.safetensors" --batch-size 128 --val-steps 1 \
    --concat-neighbour-latents --prediction sample --condition-dropout 0.1

if [ -n "${EVAL_DATA:-}" ]; then
    # Scored on the subjects the model file records as held out (whatever split made it).
    EVAL_OPTIONS=(--data "$EVAL_DATA" --model "$OUT/ldm/best.safetensors" --tasks 1 --methods linear,registration,latent-linear,calid,calid+
                  --subjects held-out --out "$OUT/evaluation")
    if [ -n "${EVAL_LABELS:-}" ]; then EVAL_OPTIONS+=(--labels "$EVAL_LABELS"); fi
    "${CALID_COMMAND[@]}" evaluate "${EVAL_OPTIONS[@]}"
fi
echo "models: $OUT/vae/best.safetensors, $OUT/ldm/best.safetensors"
