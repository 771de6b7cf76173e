#!/usr/bin/env bash
# REST against gRPC of one peer server from the shared peer harness, on bench_serving.py's load (one
# FP32 [1,224,224,3] image per request, tritonclient.http with binary data vs tritonclient.grpc, each
# client thread with its own client, interleaved rounds): KServe 0.21's ModelServer (REST 18280, gRPC
# 18281) or Triton via pytriton (REST 18780, gRPC 18781), started with the harness's own command lines
# on the same ONNX file (the active efficientnet-lite0 version in $PEERBENCH/hs-models), then stopped.
#
# Usage, from the project root (needs .venv and a harness work directory filled by its setup.sh):
#   PEERBENCH=~/peerbench bench/peer_rest.sh kserve|pytriton [SECS=15] [ROUNDS=3] [CLIENTS=1,4,16]
# headswap on the same load and file: .venv/bin/python bench/bench_serving.py --protocol http \
#   --model-dir $PEERBENCH/hs-models --seconds 15 --rounds 3 --clients 1,4,16
# Env: PEER_HARNESS (default ../shared/peer-bench), MODEL_DIR (default $PEERBENCH/hs-models).
set -u
NAME=${1:?kserve or pytriton}; SECS=${2:-15}; ROUNDS=${3:-3}; CLIENTS=${4:-1,4,16}
[ -n "${PEERBENCH:-}" ] || { echo "set PEERBENCH to the harness work directory (see its README)"; exit 2; }
PB=$(cd "$PEERBENCH" && pwd); HERE=$(cd "${PEER_HARNESS:-../shared/peer-bench}" && pwd)
MODEL_DIR=${MODEL_DIR:-$PB/hs-models}
MODEL=$(.venv/bin/python - "$MODEL_DIR" <<'EOF'
import json, os, sys
d = os.path.join(sys.argv[1], "efficientnet-lite0")
print(os.path.join(d, str(json.load(open(os.path.join(d, "active.json")))["version"]), "model.onnx"))
EOF
) || { echo "no efficientnet-lite0 in $MODEL_DIR (run the harness's run_all.sh once: headswap exports it)"; exit 2; }
mkdir -p "$PB/pids" "$PB/logs" "$PB/run/$NAME"
set +m
case $NAME in
  kserve) HTTP=18280; GRPC=18281
    (cd "$PB/run/$NAME" && MODEL=$MODEL PYTHONDONTWRITEBYTECODE=1 exec setsid "$PB/kservenv/bin/python" \
       "$HERE/kserve/kserve_ort.py" --http_port $HTTP --grpc_port $GRPC --enable_latency_logging false) \
       > "$PB/logs/$NAME-rest.log" 2>&1 < /dev/null & ;;
  pytriton) HTTP=18780; GRPC=18781
    libdir=$("$PB/pytritonenv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
    (cd "$PB/run/$NAME" && MODEL=$MODEL PYTHONDONTWRITEBYTECODE=1 LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
       exec setsid "$PB/pytritonenv/bin/python" "$HERE/pytriton/pytriton_ort.py" --grpc-port $GRPC --http-port $HTTP) \
       > "$PB/logs/$NAME-rest.log" 2>&1 < /dev/null & ;;
  *) echo "unknown peer $NAME (kserve or pytriton)"; exit 2;;
esac
PID=$!
echo $PID > "$PB/pids/$NAME.pid"
s=$(cat /proc/$PID/stat); s=${s##*) }; set -- $s; echo "${20}" > "$PB/pids/$NAME.start"   # for stop_servers.sh
trap 'PEERBENCH=$PB "$HERE/stop_servers.sh" $NAME' EXIT
"$PB/clientenv/bin/python" "$HERE/wait_ready.py" --workdir "$PB" --name $NAME --url 127.0.0.1:$GRPC --pid $PID \
  --timeout 180 || { tail -5 "$PB/logs/$NAME-rest.log"; exit 1; }
echo "$NAME: REST 127.0.0.1:$HTTP, gRPC 127.0.0.1:$GRPC, model $MODEL"
PYTHONPATH=service .venv/bin/python bench/bench_serving.py --protocol http --http-target 127.0.0.1:$HTTP \
  --grpc-target 127.0.0.1:$GRPC --seconds "$SECS" --rounds "$ROUNDS" --clients "$CLIENTS"
