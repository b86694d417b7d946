"""Starting runs: one rank (`run.py`, for the CLI and Ray workers), the Ray controller and its actors, and the
watchdog that names a hung or straggling rank."""
