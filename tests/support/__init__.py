"""What the tests and the benchmarks share: a live server, adapter builders, tiny models, hostile inputs."""
