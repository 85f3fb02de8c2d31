"""Per-user prefix registry on MLflow + an object store (file:// or s3://). Needs no torch."""
