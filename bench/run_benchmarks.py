"""Former entry point, kept as an alias: ``python -m bench.run_benchmarks`` runs ``python -m bench.run``."""
from bench.run import main

if __name__ == "__main__":
    main()
