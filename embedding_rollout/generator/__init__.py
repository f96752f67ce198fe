"""The embedding generator: a TF Serving compatible model server and its client."""
