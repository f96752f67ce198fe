"""Triggers of the rollout's deferrable tasks; they run in Airflow's triggerer, outside the DAG bundle."""
