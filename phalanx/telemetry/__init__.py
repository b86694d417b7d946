"""Telemetry leaves: health facts a controller reads and counters of the collectives a rank issues."""
