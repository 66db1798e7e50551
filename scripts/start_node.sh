#!/usr/bin/env bash
# A node's services, cluster.yaml's start commands (the loopback `ray up` test runs the same):
#   start_node.sh head     MLflow's tracking server (basic-auth app) and the Ray head
#   start_node.sh worker   a Ray worker joining $RAY_HEAD_IP (Ray sets it for worker start commands)
# The services run under one supervisor in a session of their own, recorded in ~/.varcon-run/<role>.pid: a second
# start (`ray up` again, `--restart-only`) stops exactly what the first started, never another user's processes or
# another Ray instance on the node (no `ray stop`, no pkill by name). `ray down` runs `ray stop`, which ends this
# user's Ray processes; the supervisor then stops the tracking server and exits, so nothing of this node's user is
# left running. Every `ray start` uses Ray's token authentication (the token file_mounts copied to ~/.ray/auth_token).
set -euo pipefail
ROLE=${1:-}
if [ "$ROLE" != head ] && [ "$ROLE" != worker ]; then
  echo "usage: start_node.sh head|worker" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/node_env.sh"
if [ -z "$VARCON_MLFLOW_HOST" ]; then  # the head's private address: the tracking server listens there
  if [ "$ROLE" = head ]; then VARCON_MLFLOW_HOST=$(hostname -I | awk '{print $1}'); else VARCON_MLFLOW_HOST=$RAY_HEAD_IP; fi
fi
if [ "$ROLE" = head ] && [ -z "$VARCON_MLFLOW_ARTIFACTS" ]; then
  echo "[start-head] VARCON_MLFLOW_ARTIFACTS is empty in $CLUSTER_ENV: name the store of MLflow's artifacts" \
       "(e.g. s3://<bucket>/mlflow; cluster.env.example)" >&2
  exit 2
fi
VENV_BIN=$VARCON_CHECKOUT/.venv/bin
VARCON_RUN=$HOME/.varcon-run   # this node's pid files and service logs
log() { printf '[start-%s] %s\n' "$ROLE" "$*"; }

stop_started() {  # stop_started NAME: ends the supervisor whose pid NAME.pid holds and its session, if it still runs
  local pidfile="$VARCON_RUN/$1.pid" pid
  pid=$(cat "$pidfile" 2> /dev/null || true)
  [ -n "$pid" ] || return 0
  # still the session leader start_node.sh started (its command line: a reused pid is left alone)
  if [ "$(ps -o sid= -p "$pid" | tr -d ' ')" = "$pid" ] &&
     ps -o args= -p "$pid" | grep -q "start_node.sh $1 --supervise"; then
    kill -TERM -- "-$pid" 2> /dev/null || true
    for _ in $(seq 60); do pgrep -s "$pid" > /dev/null || break; sleep 0.5; done
    pkill -KILL -s "$pid" 2> /dev/null || true
  fi
  rm -f "$pidfile"
}

# What every service of this node inherits: the environment's tools, the node's copy of the project before any
# installed one (a prebuilt environment's project may be an older checkout), Ray's token authentication.
export PATH=$VENV_BIN:$PATH PYTHONPATH=$VARCON_CHECKOUT RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 \
  MLFLOW_DISABLE_TELEMETRY=true MLFLOW_TRACKING_URI=http://$VARCON_MLFLOW_HOST:$VARCON_MLFLOW_PORT

run_head() {  # the supervisor of the head's services (in its own session)
  # MLflow: its backend (and its users, mlflow_auth.ini) on a PostgreSQL database that outlives the cluster, its
  # artifacts in VARCON_MLFLOW_ARTIFACTS, proxied by the server; the Flask key from a mounted file
  MLFLOW_AUTH_CONFIG_PATH=$HOME/.varcon/mlflow_auth.ini \
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat ~/.varcon/mlflow_secret_key)" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    mlflow server --app-name basic-auth --host "$VARCON_MLFLOW_HOST" --port "$VARCON_MLFLOW_PORT" \
    --workers "$VARCON_MLFLOW_WORKERS" --backend-store-uri "$(cat ~/.varcon/mlflow_database_uri)" \
    --artifacts-destination "$VARCON_MLFLOW_ARTIFACTS" &
  ray start --head --block --port="$VARCON_RAY_PORT" --dashboard-host=127.0.0.1 \
    --dashboard-port="$VARCON_DASHBOARD_PORT" --ray-client-server-port="$VARCON_RAY_CLIENT_PORT" \
    --object-manager-port="$VARCON_OBJECT_MANAGER_PORT" --dashboard-agent-listen-port="$VARCON_DASHBOARD_AGENT_PORT" \
    --autoscaling-config="$HOME/ray_bootstrap_config.yaml" &
  supervise $!
}

run_worker() {
  ray start --block --address="$RAY_HEAD_IP:$VARCON_RAY_PORT" --object-manager-port="$VARCON_OBJECT_MANAGER_PORT" \
    --dashboard-agent-listen-port="$VARCON_DASHBOARD_AGENT_PORT" &
  supervise $!
}

supervise() {  # supervise RAY_PID: ends the session once `ray start --block` has ended or has no Ray process left
  local ray_pid=$1
  until grep -q "Ray runtime started" "$VARCON_RUN/$ROLE.log" || ! kill -0 "$ray_pid" 2> /dev/null; do sleep 1; done
  # `ray stop` ends Ray's processes with SIGTERM, which `ray start --block` takes for a graceful exit and goes on
  # blocking: it is done when it has no child left
  while kill -0 "$ray_pid" 2> /dev/null && pgrep -P "$ray_pid" > /dev/null; do sleep 2; done
  log "Ray has stopped on this node: stopping its other services"
  kill -TERM -- "-$$"  # this session (the supervisor leads it): the tracking server, what is left of Ray, and this
}

if [ "${2:-}" = "--supervise" ]; then
  "run_$ROLE"
  exit 1  # not reached: supervise ends this session, this shell with it
fi

mkdir -p "$VARCON_RUN"
stop_started "$ROLE"
: > "$VARCON_RUN/$ROLE.log"  # the readiness checks below read this run's log only
setsid nohup bash "${BASH_SOURCE[0]}" "$ROLE" --supervise > "$VARCON_RUN/$ROLE.log" 2>&1 < /dev/null &
echo $! > "$VARCON_RUN/$ROLE.pid"
# ready when Ray says it started, the node's dashboard agent (which runs submitted jobs; the head refuses a job
# while it has none) answers and, on the head, the tracking server answers: `ray up` goes on only then, and a
# service that cannot start fails this command with its log instead of a cluster that never works
agent_answers() { python -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2)" \
                    "$VARCON_DASHBOARD_AGENT_PORT" 2> /dev/null; }
mlflow_answers() { python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
                     "$MLFLOW_TRACKING_URI/health" 2> /dev/null; }
for _ in $(seq 240); do
  if grep -q "Ray runtime started" "$VARCON_RUN/$ROLE.log" && agent_answers &&
     { [ "$ROLE" = worker ] || mlflow_answers; }; then
    log "started (log: $VARCON_RUN/$ROLE.log)"
    exit 0
  fi
  kill -0 "$(cat "$VARCON_RUN/$ROLE.pid")" 2> /dev/null || break
  sleep 0.5
done
log "did not start within 2 minutes; its log ($VARCON_RUN/$ROLE.log) ends:"
tail -n 40 "$VARCON_RUN/$ROLE.log" >&2
stop_started "$ROLE"
exit 1
