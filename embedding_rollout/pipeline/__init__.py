"""Step commands' work: indexing (initial load, backfill) and its verification."""
