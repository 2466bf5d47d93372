#!/usr/bin/env bash
# The whole self-improvement loop: 01 -> 02 -> 03 -> 04 for ITERS iterations, then 05.
#
#   bash loop.sh                      # the CPU demo: embedded model, bundled data, 2 iterations
#   ITERS=1 LIMIT=4 bash loop.sh      # smaller
#
# Iteration 1 builds language-imbalance pairs (English answers, self-translated, are
# preferred over native answers in the other languages; with INTO_ENGLISH=1 also the reverse into English).
# From iteration 2 on, REWARD=implicit (default) scores several samples per prompt with
# the previous iteration's trained model against its reference (implicit cross-lingual
# rewarding); REWARD=imbalance repeats iteration 1's method with the new policy.
# Each trained model is the next iteration's policy (with LORA_RANK: the base plus that iteration's adapter,
# which the next iteration trains on). 05 evaluates on EVAL_PROMPTS, which no iteration
# trains on (it checks every iteration's responses.jsonl), and its report leads with the effect: the last
# model minus the base on language fidelity of answers to those held-out prompts. Everything lands in $RUN:
#   $RUN/iter1/{responses,translated,pairs,pairs.eval}.jsonl  $RUN/iter1/model/
#   $RUN/iter2/...                                            $RUN/eval/report.md, report.png
# Each stage skips work already done, so rerunning after an interruption continues.
#
# On GPUs, let a serving engine generate: SERVE is the command that serves one model, with {model} and
# {port} where the model's directory and a port go. loop.sh starts it for each iteration's policy (01 and
# 02 send it their requests), waits for /health, and stops it before 04 trains; for 05 it serves each model
# in turn (answers only; the judge and the report run after). Scoring (03, 04) stays in-process.
#   SERVE="vllm serve {model} --host 127.0.0.1 --port {port}" bash loop.sh
#   SERVE="python -m sglang.launch_server --model-path {model} --host 127.0.0.1 --port {port}" bash loop.sh
#   SERVE="transformers serve {model} --host 127.0.0.1 --port {port} --device cpu" \
#     GEN_ARGS="--repetition-penalty 1.0" SERVE_LORA= bash loop.sh
# vLLM's CPU build (bash .ci/vllm-cpu-env makes .venv-vllm), fp32: the tests run exactly this:
#   SERVE=".venv-vllm/bin/vllm serve {model} --host 127.0.0.1 --dtype float32 --enforce-eager --port {port}" ...
set -euo pipefail
cd "$(dirname "$0")"

RUN=${RUN:-runs/loop}                   # where everything goes
ITERS=${ITERS:-2}                       # self-improvement iterations
MODEL=${MODEL:-smollm2-135m}            # the starting policy (hub id, directory, or the embedded default)
PROMPTS=${PROMPTS:-data/alpagasus}      # training prompts (parallel, same ids in every language)
EVAL_PROMPTS=${EVAL_PROMPTS:-data/x-alpacaeval}  # held-out prompts for 05 (the papers' X-AlpacaEval): no
                                        # iteration trains on them (05 checks)
LANGS=${LANGS:-en,es,de,fr}             # English first: it is the teacher (+ru,zh: ~4x the tokens each)
LIMIT=${LIMIT:-24}                      # prompt ids per language used for training pairs
SEED=${SEED:-0}                         # sampling, held-out pair split, data order, bootstrap
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}   # answer length for training data (96 moved nothing: RESULTS.md section 1)
KEEP_TRUNCATED=${KEEP_TRUNCATED:-1}     # 1: also pair answers cut at MAX_NEW_TOKENS (the CPU demo cuts many)
INTO_ENGLISH=${INTO_ENGLISH:-0}         # 1: 02 also translates the other answers into English, for English pairs
                                        # (the papers do; a 135M model copies its source: RESULTS.md section 2)
REWARD=${REWARD:-implicit}              # method from iteration 2 on: implicit | imbalance
SAMPLES=${SAMPLES:-3}                   # samples per prompt for implicit rewarding (paper: 10)
EPOCHS=${EPOCHS:-1}                     # DPO epochs per iteration
LORA_RANK=${LORA_RANK:-0}               # >0: 04 trains LoRA adapters of this rank on the frozen model (0: all weights)
if [ "$LORA_RANK" = 0 ]; then
  LR=${LR:-3e-5}                        # DPO learning rate (a 135M model needs more: RESULTS.md section 1)
else
  LR=${LR:-3e-4}                        # LoRA's adapters want ~10x full training's rate (RESULTS.md section 7)
fi
MERGED=${MERGED:-1}                     # with LORA_RANK: 1 also writes each merged fp32 model, model/merged (cheap at
                                        # 135M; 32 GB an iteration at 8B, which the loop does not need: 0)
NLL_WEIGHT=${NLL_WEIGHT:-1}             # DPO+NLL, as the papers train (0: plain DPO)
# 05: answers to every held-out prompt (language fidelity, the effect the report leads with), win rate on the
# first JUDGE_LIMIT. Math is left out of the CPU demo: no 135M model reaches an answer in this many tokens,
# so its panel could not move; add EVAL_TASKS=mgsm,winrate with EVAL_MAX_NEW_TOKENS=512 at paper scale.
EVAL_TASKS=${EVAL_TASKS:-winrate}
EVAL_LIMIT=${EVAL_LIMIT:-180,en=60}     # held-out prompts per language for M0 and the last model: enough to see
                                        # an 8-point effect in each (RESULTS.md section 1); English, at its ceiling,
                                        # needs fewer
EVAL_MIDDLE_LIMIT=${EVAL_MIDDLE_LIMIT:-60}  # ... and for the models between (M1), which the effect does not compare
JUDGE_LIMIT=${JUDGE_LIMIT:-10}          # of those, judged for the win rate (a 135M judge: a smoke test)
EVAL_MAX_NEW_TOKENS=${EVAL_MAX_NEW_TOKENS:-48}  # the shortest answer whose effect matches 64 tokens': the drift
                                                # into English comes late in an answer (RESULTS.md section 1)
PYTHON=${PYTHON:-python}
TRAIN=${TRAIN:-$PYTHON}                 # e.g. TRAIN="torchrun --nproc_per_node=8" on a multi-GPU machine
TRAIN_ARGS=${TRAIN_ARGS:---batch-size 4 --grad-accum 1}  # extra flags for 04_dpo.py (4 pairs a step here)
GEN_ARGS=${GEN_ARGS:-}                  # extra flags for 01 (e.g. --repetition-penalty 1.0 for a server without one)
SERVE=${SERVE:-}                        # serve each policy with this command (above); empty: generate in-process
SERVE_PORT=${SERVE_PORT:-8000}
# With LORA_RANK, SERVE serves the base and these flags add the policy's adapter as a LoRA module ({rank},
# {name}, {adapter} filled in): vLLM's by default (vLLM takes ranks 1, 8, 16, 32, 64, ...). SERVE_LORA= (empty)
# serves each merged copy instead (MERGED=1: for a server that takes no adapters, such as transformers serve).
SERVE_LORA=${SERVE_LORA-"--enable-lora --max-lora-rank {rank} --lora-modules {name}={adapter}"}
SERVE_WAIT=${SERVE_WAIT:-900}           # seconds a server may take to come up (a 70B model loads for minutes)

stage() { echo; echo "== $(date +%H:%M:%S) iteration $1: $2"; }

server_pid=""
server=()  # the --server flag for 01, 02 and 05 while a server runs
start_server() {  # $1: the model to serve, $2: its log file
  [ -n "$SERVE" ] || return 0
  local path command lora=""
  path=$($PYTHON -c 'import sys, common; print(common.resolve_model(sys.argv[1]))' "$1")
  if [ -f "$path/adapter/adapter_config.json" ] && [ -n "$SERVE_LORA" ]; then  # a LoRA policy: its base, plus
    lora=${SERVE_LORA//\{rank\}/$LORA_RANK}                                    # its adapter as a LoRA module
    lora=${lora//\{name\}/$(basename "$(dirname "$path")")}  # iter1, ...: 01, 02 and 05 find it by its folder
    lora=${lora//\{adapter\}/$path/adapter}
    path=$($PYTHON -c 'import sys, common; print(common.resolve_model(common.base_model(sys.argv[1])))' "$1")
  elif [ -f "$path/adapter/adapter_config.json" ]; then  # without SERVE_LORA: the merged copy (MERGED=1)
    path=$path/merged
  fi
  command="${SERVE//\{model\}/$path} $lora"
  echo "serving $path: ${command//\{port\}/$SERVE_PORT} (log: $2)"
  ${command//\{port\}/$SERVE_PORT} > "$2" 2>&1 &
  server_pid=$!
  for _ in $(seq "$SERVE_WAIT"); do
    if $PYTHON -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
        "http://127.0.0.1:$SERVE_PORT/health" 2> /dev/null; then
      server=(--server "http://127.0.0.1:$SERVE_PORT/v1")
      return 0
    fi
    if ! kill -0 "$server_pid" 2> /dev/null; then
      echo "the server exited before it was up; the end of $2:"; tail -n 20 "$2"; exit 1
    fi
    sleep 1
  done
  echo "the server was not up after $SERVE_WAIT s; the end of $2:"; tail -n 20 "$2"; exit 1
}
stop_server() {  # also on any exit, so a failed stage never leaves a server holding the GPU
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2> /dev/null || true
    wait "$server_pid" 2> /dev/null || true
  fi
  server_pid=""
  server=()
}
trap stop_server EXIT
trap 'exit 130' INT TERM  # so that Ctrl-C or a kill runs the EXIT trap too
keep=(); [ "$KEEP_TRUNCATED" = 1 ] && keep=(--keep-truncated)
merged=(); [ "$LORA_RANK" != 0 ] && [ "$MERGED" = 1 ] && merged=(--save-merged)
if [ -n "$SERVE" ] && [ "$LORA_RANK" != 0 ] && [ -z "$SERVE_LORA" ] && [ "$MERGED" != 1 ]; then
  echo "SERVE with LORA_RANK and no SERVE_LORA serves each iteration's merged copy: set MERGED=1"; exit 2
fi
into=(); [ "$INTO_ENGLISH" = 1 ] || into=(--no-into-dominant)

policy=$MODEL
reference=""
models=("$MODEL")
trained_on=()  # every iteration's training prompts: 05 refuses to evaluate any of them
for iteration in $(seq 1 "$ITERS"); do
  dir=$RUN/iter$iteration
  mkdir -p "$dir"
  start_server "$policy" "$dir/server.log"
  if [ "$iteration" -eq 1 ] || [ "$REWARD" = imbalance ]; then
    stage "$iteration" "01 generate (greedy, one answer per prompt)"
    $PYTHON 01_generate.py --model "$policy" --prompts "$PROMPTS" --langs "$LANGS" --limit "$LIMIT" \
      --max-new-tokens "$MAX_NEW_TOKENS" --seed "$SEED" --output "$dir/responses.jsonl" "${server[@]}" $GEN_ARGS
    stage "$iteration" "02 translate (the policy translates its own answers)"
    $PYTHON 02_translate.py --model "$policy" --input "$dir/responses.jsonl" --seed "$SEED" \
      --output "$dir/translated.jsonl" "${into[@]}" "${server[@]}"
    stop_server
    stage "$iteration" "03 reward (language-imbalance pairs)"
    $PYTHON 03_reward.py --method imbalance --input "$dir/translated.jsonl" --output "$dir/pairs.jsonl" \
      --eval-frac 0.15 --seed "$SEED" "${keep[@]}"
  else
    stage "$iteration" "01 generate ($SAMPLES samples per prompt, temperature 0.9)"
    $PYTHON 01_generate.py --model "$policy" --prompts "$PROMPTS" --langs "$LANGS" --limit "$LIMIT" \
      --max-new-tokens "$MAX_NEW_TOKENS" --num-samples "$SAMPLES" --temperature 0.9 --seed "$SEED" \
      --output "$dir/responses.jsonl" "${server[@]}" $GEN_ARGS
    stop_server
    stage "$iteration" "03 reward (implicit: $policy against $reference)"
    $PYTHON 03_reward.py --method implicit --input "$dir/responses.jsonl" --output "$dir/pairs.jsonl" \
      --dpo-model "$policy" --ref-model "$reference" --eval-frac 0.15 --seed "$SEED" "${keep[@]}"
  fi
  stage "$iteration" "04 DPO (+NLL) training"
  $TRAIN 04_dpo.py --model "$policy" --input "$dir/pairs.jsonl" --eval-pairs "$dir/pairs.eval.jsonl" \
    --output "$dir/model" --epochs "$EPOCHS" --lr "$LR" --nll-weight "$NLL_WEIGHT" --seed "$SEED" \
    --lora-rank "$LORA_RANK" "${merged[@]}" $TRAIN_ARGS
  reference=$policy
  policy=$dir/model
  models+=("$policy")
  trained_on+=("$dir/responses.jsonl")
done

stage "all" "05 evaluate: ${models[*]}"
evaluate=(05_eval.py --models "${models[@]}" --tasks "$EVAL_TASKS" --langs "$LANGS" --prompts "$EVAL_PROMPTS"
  --limit "$EVAL_LIMIT" --middle-limit "$EVAL_MIDDLE_LIMIT" --judge-limit "$JUDGE_LIMIT"
  --max-new-tokens "$EVAL_MAX_NEW_TOKENS" --batch-size 64 --seed "$SEED" --trained-on "${trained_on[@]}" --output "$RUN/eval")
if [ -n "$SERVE" ]; then  # each model answers on its own server, one at a time; then judge and report
  mkdir -p "$RUN/eval"
  for k in "${!models[@]}"; do
    start_server "${models[$k]}" "$RUN/eval/server$k.log"
    $PYTHON "${evaluate[@]}" "${server[@]}" --answers-only
    stop_server
  done
fi
$PYTHON "${evaluate[@]}"
echo
echo "done: $RUN/eval/report.md"
