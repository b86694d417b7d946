"""The offline planner (`phalanx plan`): cost model, topology, rank placement and calibration."""
