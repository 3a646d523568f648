"""keepflow benchmarks: a reproducible test tree (`bench.gentree`) and a harness that
times keepflow against restic and rsync on it (`bench.run`, results in bench/RESULTS.md)."""
