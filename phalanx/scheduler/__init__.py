"""When and where things run (see ARCHITECTURE.md): pipeline schedules (`pipeline.py`); the
communication planner lands here too."""
