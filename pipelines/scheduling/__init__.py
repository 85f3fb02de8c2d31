"""Nightly retraining and other recurring commands, on a cron schedule."""
