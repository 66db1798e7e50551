#!/usr/bin/env bash
# End-to-end check of the cluster entry point on this machine: start a Ray head on loopback from the project's
# environment, `ray job submit --working-dir . -- varcon train ...` (the demo, shortened), wait for success,
# check the MLflow run it recorded, and stop the head this script started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true RAY_AUTH_MODE=token
home=$(mktemp -d)
# This check's own token (Ray reads RAY_AUTH_TOKEN before ~/.ray/auth_token): a fresh machine has none, and the
# user's own token, if any, is left alone. The head, the job CLI and the job's driver inherit it.
RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dash=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# --block keeps `ray start` in the foreground of its own process: stopping it stops this head and nothing else
# (`ray stop` would stop every Ray instance on the machine); setsid gives it a session of its own, which every process
# of this head (GCS, raylet, dashboard and its modules, workers) inherits and no other process has.
setsid ray start --head --block --node-ip-address=127.0.0.1 --port="$port" --dashboard-host=127.0.0.1 \
  --dashboard-port="$dash" --num-cpus=2 --disable-usage-stats --temp-dir="$home/ray" > "$home/ray-start.log" 2>&1 &
head_pid=$!
stop_head() {
  local session
  session=$(ps -o sid= -p "$head_pid" | tr -d ' ') || true
  kill "$head_pid" 2> /dev/null || true
  wait "$head_pid" 2> /dev/null || true  # the killed `ray start` exits non-zero: not this check's result
  # The head's processes outlive `ray start` by a moment and keep writing their logs under $home/ray, so an rm -rf at
  # once can fail on a folder that is not empty any more (seen on a clean clone): wait for the head's session to
  # empty (bounded: 60 s), end what is left of it, then remove the folder.
  if [[ -n $session && $session != "$(ps -o sid= -p $$ | tr -d ' ')" ]]; then  # never this script's own session
    for _ in $(seq 120); do
      pgrep -s "$session" > /dev/null || break
      sleep 0.5
    done
    pkill -KILL -s "$session" 2> /dev/null || true
  fi
  rm -rf "$home"
}
trap stop_head EXIT
for _ in $(seq 120); do  # wait until the job server answers (bounded: 60 s)
  ray job list --address "http://127.0.0.1:$dash" > /dev/null 2>&1 && break
  kill -0 "$head_pid" 2> /dev/null || { cat "$home/ray-start.log"; exit 1; }
  sleep 0.5
done
echo "[job-submit] Ray head on 127.0.0.1:$port (dashboard :$dash)"
ray job submit --address "http://127.0.0.1:$dash" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"VARCON_HOME\": \"$home\"}}" \
  -- varcon train optim.epochs=2 optim.warmup_epochs=0 eval.linear_probe_epochs=5 eval.few_shot_episodes=10 \
     name=job-submit
python - "$home" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(f"sqlite:///{sys.argv[1]}/.cache/mlflow/mlflow.db")
(run,) = client.search_runs([client.get_experiment_by_name("varcon").experiment_id])
steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_knn_top1_k20"))
assert run.info.status == "FINISHED" and steps == [0, 1, 2], (run.info.status, steps)
print(f"[job-submit] passed: MLflow run {run.info.run_id} FINISHED with kNN at epochs {steps}")
PY
