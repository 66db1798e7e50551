# Sourced by the node scripts (node_setup.sh, node_mounts.sh, start_node.sh): the cluster's own values from
# ~/.varcon/cluster.env (cluster.env.example lists them; file_mounts copies ~/.varcon to every node), with defaults
# for what a cluster need not set.
CLUSTER_ENV=${VARCON_CLUSTER_ENV:-$HOME/.varcon/cluster.env}
if [ ! -f "$CLUSTER_ENV" ]; then
  echo "[node] $CLUSTER_ENV is missing: copy cluster.env.example to ~/.varcon/cluster.env on the machine you run" \
       "\`ray up\` from and fill it in (cluster.yaml's file_mounts copies ~/.varcon to the nodes)" >&2
  exit 2
fi
set -a  # every value is exported: the services started here read MLFLOW_S3_ENDPOINT_URL and the like themselves
# shellcheck source=/dev/null
source "$CLUSTER_ENV"
set +a
: "${VARCON_SHARED_FS:=}" "${VARCON_SHARED_DIR:=/mnt/shared}" "${VARCON_MLFLOW_ARTIFACTS:=}"
: "${VARCON_MLFLOW_HOST:=}" "${VARCON_MLFLOW_PORT:=5000}" "${VARCON_MLFLOW_WORKERS:=4}" "${VARCON_RAY_PORT:=6379}"
: "${VARCON_DASHBOARD_PORT:=8265}" "${VARCON_RAY_CLIENT_PORT:=10001}" "${VARCON_OBJECT_MANAGER_PORT:=8076}"
: "${VARCON_DASHBOARD_AGENT_PORT:=52365}"
: "${VARCON_PREBUILT_VENV:=}" "${VARCON_WHEELHOUSE:=}"
[ -n "${MLFLOW_S3_ENDPOINT_URL:-}" ] || unset MLFLOW_S3_ENDPOINT_URL  # empty: boto3's own (AWS)
# empty VARCON_MLFLOW_HOST: the head's private address (start_node.sh: this node's on the head, $RAY_HEAD_IP else)
VARCON_CHECKOUT=$HOME/varcon  # cluster.yaml's file_mounts: the project, as `ray up` copied it
