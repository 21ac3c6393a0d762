#!/usr/bin/env bash
# 3D U²-Net experiments.
#
#   bash train_models.sh            the paper's experiment list on dataset/ (GPU-sized, days of training):
#                                   independent model per task, shared model, universal model, and the
#                                   shared and universal models adapted to Task09_Spleen
#   bash train_models.sh --demo     laptop demo on generated data: about 6 minutes on 2 CPU cores
#                                   (--demo --seed N: another seed for the data and the training runs)
#   bash train_models.sh --dry_run  print the paper list's commands without running them
#   bash train_models.sh --gpus N   the paper list, every training run data parallel under torchrun with N
#                                   processes (one per GPU); also with --dry_run
#
# Environment: PYTHON (default: the first of python, python3, .venv/bin/python that has the
# requirements), TAG (paper list: output folder tag, default "paper"), DEVICE (paper list: default
# cuda); demo: DEMO_SEED (as --seed), DEMO_TRAIN_ARGS / DEMO_PREDICT_ARGS (extra flags for every
# training run / predict.py call, e.g. DEMO_TRAIN_ARGS="--grad_none"), DEMO_LANE_FORK=0 (each job of a
# lane its own interpreter); with --gpus: TORCHRUN_ARGS (torchrun's
# arguments besides --nproc_per_node, default --standalone; for several nodes e.g. "--nnodes 2
# --rdzv_backend c10d --rdzv_endpoint HOST:29400 --rdzv_id JOB", the same on every node). See docs/training.md.
set -euo pipefail
cd "$(dirname "$0")"
# the first Python that has the requirements: $PYTHON, python, python3, ./.venv/bin/python
PY=""
for cand in ${PYTHON:-} python python3 .venv/bin/python; do
    if command -v "$cand" > /dev/null 2>&1 && "$cand" -c "import torch, SimpleITK, batchgenerators" > /dev/null 2>&1; then
        PY="$cand"
        break
    fi
done
if [[ -z "$PY" ]]; then
    echo "no Python with the requirements found: pip install -r requirements.txt (or set PYTHON=...)" >&2
    exit 2
fi

FIVE="Task02_Heart Task03_Liver Task04_Hippocampus Task05_Prostate Task07_Pancreas"
FIVE_DIR="${FIVE// /_}"

paper() {
    local run="$1" TAG="${TAG:-paper}" DEV="${DEVICE:-cuda}" gpus=0
    shift
    while (($#)); do
        case "$1" in
            --gpus) gpus="${2:-}"; shift $(($# > 1 ? 2 : 1)) ;;
            *) echo "unknown option $1 (use --gpus N)" >&2; exit 2 ;;
        esac
    done
    if ! [[ "$gpus" =~ ^[0-9]+$ ]]; then
        echo "--gpus needs a number of processes per run, got '$gpus'" >&2
        exit 2
    fi
    # the training runs: plain, or under torchrun with N processes (data parallel, docs/training.md)
    local train=("$PY") launch
    if ((gpus > 0)); then
        read -r -a launch <<< "${TORCHRUN_ARGS:---standalone}"
        train=("$PY" -m torch.distributed.run "${launch[@]}" --nproc_per_node "$gpus")
    fi
    # data: header statistics, preprocessing (resumable: finished cases are skipped) and fold splits
    $run "$PY" data_explore.py --dataset_dir dataset
    $run "$PY" preprocess_taskSep.py --dataset_dir dataset --prep_dir prepData
    # every run with --continue: rerunning the list after an interruption resumes each run from its
    # last checkpoint (finished runs have nothing left to train)
    # independent models (one per task, each with its own patch, pools and batch size)
    for task in $FIVE Task09_Spleen; do
        $run "${train[@]}" train_model_no_adapters.py --trainMode independent --out_tag "$TAG" --device "$DEV" --tasks "$task" \
            --continue
    done
    # shared model, then adapted to Task09_Spleen (shared weights frozen; new heads and norms)
    $run "${train[@]}" train_model_no_adapters.py --trainMode shared --out_tag "$TAG" --device "$DEV" --tasks $FIVE --continue
    $run "${train[@]}" train_model_wt_adapters.py --trainMode shared --out_tag "${TAG}_adapted2spleen" --device "$DEV" \
        --tasks Task09_Spleen --ckp "results/res_u2net3d_shared_${TAG}/${FIVE_DIR}/checkpoints/best.pt" --continue
    # universal model (separable adapters), then adapted to Task09_Spleen (new depthwise adapters, norms, heads)
    $run "${train[@]}" train_model_wt_adapters.py --trainMode universal --module separable_adapter --base_outChans 16 \
        --out_tag "$TAG" --device "$DEV" --tasks $FIVE --continue
    $run "${train[@]}" train_model_wt_adapters.py --trainMode universal --module separable_adapter --base_outChans 16 \
        --out_tag "${TAG}_sep_adapted2spleen" --device "$DEV" --tasks Task09_Spleen \
        --ckp "results/res_u2net3d_universal_${TAG}/${FIVE_DIR}/checkpoints/best.pt" --continue
}

# ------------------------------------------------------------------------------------------------
# laptop demo: 3 generated training tasks + 1 new domain, small model, short schedule, all on CPU
# ------------------------------------------------------------------------------------------------
DEMO_DATA=dataset_demo
DEMO_PREP=prepData_demo
DEMO_RES=results/demo
DEMO_TASKS="Task91_DemoLiverCT Task92_DemoHippoMR Task93_DemoProstateMR"
DEMO_NEW=Task94_DemoSpleenCT
# Task91's cases with the tumour as its own class: the trained liver domain's label set grows
DEMO_MORE_CLASSES=Task95_DemoLiverTumourCT
DEMO_GROWN=Task91_DemoLiverCT

demo() {
    # --seed N (or DEMO_SEED=N): seed of the generated data and of every training run; without it the
    # data use seed 0 and the runs the preset's seeds (NumPy 1993, torch 1)
    local seed="${DEMO_SEED:-}"
    while (($#)); do
        case "$1" in
            --seed) seed="$2"; shift 2 ;;
            *) echo "unknown demo option $1 (use --seed N)" >&2; exit 2 ;;
        esac
    done
    local t0=$SECONDS t0_epoch
    t0_epoch=$(date +%s)
    local logs="$DEMO_RES/logs"
    # two single-threaded processes at a time use 2 cores best (small tensors scale badly over threads)
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    # stop the background runs too if the demo fails or is interrupted
    trap 'kill $(jobs -p) 2> /dev/null || true' EXIT INT TERM
    rm -rf "$DEMO_RES" "$DEMO_PREP"
    mkdir -p "$logs"
    stamp() { printf '[demo %3ds] %s\n' "$((SECONDS - t0))" "$*"; }
    # every run: small model (base 8), 32³ model patch, 3 pools, batch 2, lr 3e-3, augmentation and resize
    # to the model patch as one linear interpolation (the two-step pipeline's two cubic ones made data
    # loading a fifth of a step with both lanes running; one cubic one still 13-21 %), one validation at
    # the end
    local common=(--prep_dir "$DEMO_PREP" --results_dir "$DEMO_RES"
        --dataset_dir "$DEMO_DATA" --base_outChans 8 --batch_size 2 --lr "${DEMO_LR:-3e-3}" --val_every 0 --save_every 1000
        --num_workers 0 --threads 1 --device cpu --log_images_every 200 --no_progress
        --augment_pipeline "${DEMO_AUGMENT_PIPELINE:-composed}" --augment_interp "${DEMO_AUGMENT_INTERP:-linear}")
    if [[ -n "$seed" ]]; then common+=(--seed "$seed" --torch_seed "$seed"); fi
    # extra flags for every training run / every predict.py call (e.g. DEMO_TRAIN_ARGS="--grad_none")
    read -r -a extra_train <<< "${DEMO_TRAIN_ARGS:-}"
    read -r -a extra_predict <<< "${DEMO_PREDICT_ARGS:-}"
    common+=("${extra_train[@]}")
    # the schedule (docs/training.md, "Laptop demo"): steps per task, 147 universal, 80 independent,
    # 60 shared (the dense models at lr 6e-3, the rate falling to 0 over their second half: at 3e-3 their
    # last weights were too far from converged on some seeds); the new domain 40 when the trained model
    # is extended (17k parameters train, warm started from the liver domain), 288 at lr 6e-3 when adapted
    # as the original code did (93k parameters train, the downsampling path from scratch: at 3e-3 it
    # stalled on some seeds); the liver domain's grown label set (+ tumour) 220
    local multi=(--model_patch 32 32 32 --pools 3 3 3 --max_epoch "${DEMO_EPOCHS_MULTI:-4}"
        --steps_per_epoch "${DEMO_STEPS_MULTI:-120}")
    local universal=(--steps_per_epoch "${DEMO_STEPS_UNIVERSAL:-110}")
    local dense=(--lr "${DEMO_LR_DENSE:-6e-3}" --lr_anneal "${DEMO_ANNEAL_DENSE:-0.5}")
    local shared=(--max_epoch "${DEMO_EPOCHS_SHARED:-2}" --steps_per_epoch "${DEMO_STEPS_SHARED:-90}" "${dense[@]}")
    local indep=(--patch_size 32 32 32 --max_epoch "${DEMO_EPOCHS_INDEP:-2}" --steps_per_epoch "${DEMO_STEPS_INDEP:-40}"
        "${dense[@]}")
    local adapt=(--max_epoch "${DEMO_EPOCHS_ADAPT:-2}" --steps_per_epoch "${DEMO_STEPS_ADAPT:-20}")
    local adapt_original=(--max_epoch "${DEMO_EPOCHS_ADAPT:-2}" --steps_per_epoch "${DEMO_STEPS_ADAPT_ORIGINAL:-144}"
        --lr "${DEMO_LR_ADAPT_ORIGINAL:-6e-3}")
    local more_classes=(--max_epoch "${DEMO_EPOCHS_NEW_CLASSES:-4}" --steps_per_epoch "${DEMO_STEPS_NEW_CLASSES:-55}")

    stamp "generating demo tasks into $DEMO_DATA/"
    rm -rf "$DEMO_DATA"
    # two generators at once, each writing some of the tasks (every case has its own seed: the same files)
    local gen=(--out "$DEMO_DATA" --n_train 12 --n_test "${DEMO_N_TEST:-5}" --size "${DEMO_SIZE:-40}" --seed "${seed:-0}")
    "$PY" -m demo.data "${gen[@]}" --tasks Task91_DemoLiverCT "$DEMO_MORE_CLASSES" &
    local gen_other=$!
    "$PY" -m demo.data "${gen[@]}" --tasks Task92_DemoHippoMR Task93_DemoProstateMR "$DEMO_NEW"
    wait $gen_other
    stamp "data_explore.py"
    "$PY" data_explore.py --dataset_dir "$DEMO_DATA" --out_dir "$DEMO_RES/data_explore" --no_progress > "$logs/data_explore.log"
    stamp "preprocess_taskSep.py -> $DEMO_PREP/"
    "$PY" preprocess_taskSep.py --dataset_dir "$DEMO_DATA" --prep_dir "$DEMO_PREP" --nProc 2 --no_progress \
        > "$logs/preprocess.log"

    # one domain of the universal model exported on its own (TorchScript, and ONNX where onnx and
    # onnxruntime are installed) segments the test images (at the end of lane 2):
    # report.html checks it gives the same labels
    local uni="$DEMO_RES/res_u2net3d_universal_demo/${DEMO_TASKS// /_}"
    local hippo=Task92_DemoHippoMR fmt cmp=() export_jobs=()
    local formats=(torchscript:pt)
    if "$PY" -c "import onnx, onnxruntime" > /dev/null 2>&1; then formats+=(onnx:onnx); fi
    for fmt in "${formats[@]}"; do
        local file="$DEMO_RES/export/$hippo.${fmt##*:}"
        cmp+=(--export_file "$file" --compare "exported_${fmt%%:*}=universal")
        export_jobs+=(--log "$logs/export.log" -m models.export --ckp "$uni/checkpoints/best.pt" --task "$hippo"
            --format "${fmt%%:*}" --out "$file" :::
            --log "$logs/export.log" predict.py --model "$file" --input "$DEMO_DATA/$hippo/imagesTs"
            --output "$DEMO_RES/predictions/exported_${fmt%%:*}/$hippo" --no_progress --sequential :::)
    done
    # the test images segmented by every mode's model: "MODE RUN_FOLDER TASK" -> a predict.py job
    # (--sequential: the two lanes already keep both cores busy, reader / writer threads would only
    # compete with them)
    add_predict_jobs() {  # appends the jobs to the array PREDICT_JOBS
        local job mode run task
        for job in "$@"; do
            read -r mode run task <<< "$job"
            PREDICT_JOBS+=(--log "$logs/predict.log" predict.py --ckp "$run/checkpoints/best.pt" --task "$task"
                --input "$DEMO_DATA/$task/imagesTs" --output "$DEMO_RES/predictions/$mode/$task" --no_progress
                --sequential "${extra_predict[@]}" :::)
        done
    }
    local lane1_predict=() lane2_predict=() task
    for task in $DEMO_TASKS; do
        lane1_predict+=("independent $DEMO_RES/res_u2net3d_independent_demo/$task $task")
        lane1_predict+=("shared $DEMO_RES/res_u2net3d_shared_demo/${DEMO_TASKS// /_} $task")
        lane2_predict+=("universal $uni $task")
    done
    lane1_predict+=("universal_adapted $DEMO_RES/res_u2net3d_universal_demo_adapted/$DEMO_NEW $DEMO_NEW")
    lane1_predict+=("universal_new_classes $DEMO_RES/res_u2net3d_universal_demo_new_classes/$DEMO_MORE_CLASSES $DEMO_MORE_CLASSES")
    lane2_predict+=("universal_adapted_original $DEMO_RES/res_u2net3d_universal_demo_adapted_original/$DEMO_NEW $DEMO_NEW")
    PREDICT_JOBS=()
    add_predict_jobs "${lane1_predict[@]}"
    local lane1_jobs=("${PREDICT_JOBS[@]}")
    PREDICT_JOBS=()
    add_predict_jobs "${lane2_predict[@]}"
    local lane2_jobs=("${PREDICT_JOBS[@]}")
    : > "$logs/predict.log"
    : > "$logs/export.log"

    # two lanes keep the 2 cores busy, each ONE Python process (python -m demo.lane) that runs its
    # jobs in turn without a new interpreter start per job (5-8 s of imports each); each run's figures
    # do not depend on its lane (single-threaded, seeded), only the lanes' balance does:
    #   lane 1: independent models -> shared model -> (once the universal model is trained) the universal
    #           model extended to the new domain -> its liver domain with a grown label set (+ tumour)
    #           -> their test predictions
    #   lane 2: universal model -> the universal model adapted to the new domain as the original code
    #           did -> their test predictions -> one domain of the universal model exported, and the
    #           test images segmented with the exported file
    stamp "lane 1: independent models ($logs/independent.log), shared model ($logs/shared.log), then the universal" \
        "model extended to $DEMO_NEW ($logs/universal_adapted.log) and its $DEMO_GROWN grown to the classes of" \
        "$DEMO_MORE_CLASSES ($logs/universal_new_classes.log), then their test predictions ($logs/predict.log)"
    stamp "lane 2: universal model ($logs/universal.log), adapted to $DEMO_NEW as the original code did" \
        "($logs/universal_adapted_original.log), their test predictions ($logs/predict.log), then $hippo" \
        "exported and segmented with the exported file ($logs/export.log)"
    "$PY" -m demo.lane --times "$logs/lanes.tsv" \
        --log "$logs/independent.log" train_model_no_adapters.py --trainMode independent --out_tag demo \
            --tasks $DEMO_TASKS "${common[@]}" "${indep[@]}" ::: \
        --log "$logs/shared.log" train_model_no_adapters.py --trainMode shared --out_tag demo --tasks $DEMO_TASKS \
            "${common[@]}" "${multi[@]}" "${shared[@]}" ::: \
        --after "$logs/universal.done" --log "$logs/universal_adapted.log" train_model_wt_adapters.py \
            --trainMode universal --module separable_adapter --out_tag demo_adapted --tasks "$DEMO_NEW" \
            --ckp "$uni/checkpoints/best.pt" "${common[@]}" "${adapt[@]}" ::: \
        --log "$logs/universal_new_classes.log" train_model_wt_adapters.py --trainMode universal \
            --module separable_adapter --out_tag demo_new_classes --tasks "$DEMO_MORE_CLASSES" \
            --add_classes_to "$DEMO_GROWN" --ckp "$uni/checkpoints/best.pt" "${common[@]}" "${more_classes[@]}" ::: \
        "${lane1_jobs[@]}" &
    local lane1=$!
    "$PY" -m demo.lane --times "$logs/lanes.tsv" \
        --done "$logs/universal.done" --log "$logs/universal.log" train_model_wt_adapters.py --trainMode universal \
            --module separable_adapter --out_tag demo --tasks $DEMO_TASKS "${common[@]}" "${multi[@]}" \
            "${universal[@]}" ::: \
        --log "$logs/universal_adapted_original.log" train_model_wt_adapters.py --trainMode universal \
            --module separable_adapter --out_tag demo_adapted_original --adapt_scope original_code --tasks "$DEMO_NEW" \
            --ckp "$uni/checkpoints/best.pt" "${common[@]}" "${adapt_original[@]}" ::: \
        "${lane2_jobs[@]}" "${export_jobs[@]}" &
    local lane2=$!
    wait $lane1 || exit 1
    wait $lane2 || exit 1
    rm -f "$logs/universal.done"
    # when the last training run ended (the lanes' job times: start, end, status, command)
    local trained
    trained=$(awk -F '\t' -v t0="$t0_epoch" '$4 ~ /^train_model/ && $2 - t0 > m { m = $2 - t0 } END { printf "%d", m }' \
        "$logs/lanes.tsv")
    stamp "training finished at ${trained} s, test predictions at $((SECONDS - t0)) s"

    # the summary, then the report, in one warm Python process (one import of torch, SimpleITK, ...)
    local runs=(independent="$DEMO_RES/res_u2net3d_independent_demo"
        shared="$DEMO_RES/res_u2net3d_shared_demo/${DEMO_TASKS// /_}"
        universal="$uni"
        universal_adapted="$DEMO_RES/res_u2net3d_universal_demo_adapted/$DEMO_NEW"
        universal_adapted_original="$DEMO_RES/res_u2net3d_universal_demo_adapted_original/$DEMO_NEW"
        universal_new_classes="$DEMO_RES/res_u2net3d_universal_demo_new_classes/$DEMO_MORE_CLASSES")
    grep -m1 "^parameters" "$logs/export.log" || true
    stamp "Dice on the test cases ($DEMO_RES/summary.csv), then the visual report: charts, training curves," \
        "test-case overlays ($logs/report.log)"
    "$PY" -m demo.lane --preload demo.summary,reporting.build \
        -m demo.summary --dataset_dir "$DEMO_DATA" --results_dir "$DEMO_RES" "${runs[@]/#/--run=}" --strict ::: \
        --log "$logs/report.log" -m reporting --results_dir "$DEMO_RES" --dataset_dir "$DEMO_DATA" \
            "${runs[@]/#/--eval=}" "${cmp[@]}" --workers 2 --strict
    echo "report: $DEMO_RES/report.html"
    stamp "done in $((SECONDS - t0)) s"
    echo "demo wall time: $((SECONDS - t0)) s (everything: data, training, predictions, summary, export, report);" \
        "training finished at ${trained} s" > "$DEMO_RES/wall_time.txt"
}

case "${1:-}" in
    --demo) shift; demo "$@" ;;
    --dry_run) shift; paper echo "$@" ;;
    "" | --gpus) paper "" "$@" ;;
    -h | --help) sed -n '2,19p' "$0" ;;
    *) echo "unknown option $1 (use --demo, --dry_run, --gpus N or nothing)" >&2; exit 2 ;;
esac
