"""Training jobs on Ray: read and validate the data, plan who trains, train packed on trainer
actors, gate and publish each user, and record the job as an MLflow run."""
