# MLflow tracking server for compose.yaml: the official image plus the PostgreSQL driver and
# boto3, so runs live in Postgres and run artifacts (loss plots, per-user tables) in MinIO.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary boto3
