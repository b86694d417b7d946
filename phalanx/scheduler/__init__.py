"""When and where things run: pipeline schedules and the communication planner (see ARCHITECTURE.md).

Empty until the pipeline and planning work lands; the package exists so the layout is the target one.
"""
