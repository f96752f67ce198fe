"""Airflow operators, sensors and hooks of embedding-rollout (Airflow adds ``plugins/`` to sys.path)."""
