"""System benchmarks of the running pipeline: latency and ingest, clusters, the forgetting study, chaos."""
