"""What the CLI runs: a job loads, calls the library, saves and prints; it holds no method."""
