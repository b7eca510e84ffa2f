"""Platform job family: smoke tests and benchmarks of the job core itself."""
