"""Before any training, the tracking store is checked the way the run will use it: its URI's scheme is one of
MLflow's stores, a database store takes a connection, an MLflow server answers its health check and lets this
user read the run's experiment. Each failure is one ``TrackingError`` naming the fix (MLflow's own client would
retry for minutes, after Ray had started).
"""
from __future__ import annotations

from pipeline.config import first_line
from pipeline.tracking import TrackingError, redacted

DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores MLflow talks to directly
KNOWN_SCHEMES = ("http", "https", "file", "sqlite", "databricks", *DATABASE_SCHEMES)


def check_reachable(tracking_uri: str, experiment: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any training, when an http(s) tracking server does not answer its health check
    (MLflow's own client would retry for minutes) or refuses this user the run's ``experiment``, a database store
    does not take a connection, or the URI's scheme is none MLflow's stores use."""
    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0] if "://" in tracking_uri else "file"
    if scheme not in KNOWN_SCHEMES:
        raise TrackingError(f"tracking URI {redacted(tracking_uri)} has scheme {scheme}://, which no MLflow store "
                            f"uses: use http(s):// (an MLflow server), postgresql://, mysql://, sqlite:/// or a path")
    if scheme in DATABASE_SCHEMES:
        _check_database(tracking_uri, timeout_s)
        return
    if scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status == 200:
                _check_credentials(tracking_uri, timeout_s, experiment)
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingError(f"the MLflow tracking server {tracking_uri} does not answer ({problem}): start it "
                        f"(`mlflow server` or `varcon ui`), or unset MLFLOW_TRACKING_URI to use the local store")


def _check_credentials(tracking_uri: str, timeout_s: float, experiment: str) -> None:
    """One read of the run's experiment through MLflow's own request code, so with the credentials its client
    sends (``~/.mlflow/credentials``, ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``, and
    its TLS settings): a server behind MLflow's basic-auth app answers 401 without them or to a wrong password,
    403 to a user who may not read the experiment; 404 is an experiment the run will create."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds, read_mlflow_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(tracking_uri), "/api/2.0/mlflow/experiments/get-by-name",
                                "GET", max_retries=0, timeout=timeout_s, params={"experiment_name": experiment})
    except MlflowException:  # a server error, not a question of credentials: MLflow's client reports it later
        return
    if response.status_code in (401, 403):
        username = read_mlflow_creds().username
        given = f"the credentials of user {username!r}" if username else "no credentials"
        raise TrackingError(f"the MLflow tracking server {tracking_uri} refused {given} (HTTP "
                            f"{response.status_code}) for experiment {experiment!r}: put mlflow_tracking_username "
                            f"and mlflow_tracking_password of a user who may use it in ~/.mlflow/credentials "
                            f"(README: Tracking credentials)")


def _check_database(uri: str, timeout_s: float) -> None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(max(1, timeout_s))})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - the driver's own error (refused, unknown host, auth, no driver)
        raise TrackingError(f"the tracking database {redacted(uri)} does not take a connection "
                            f"({first_line(getattr(exc, 'orig', None) or exc)}): check host, port, database and "
                            f"credentials in tracking.tracking_uri (or MLFLOW_TRACKING_URI)") from None
