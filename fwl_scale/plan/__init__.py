"""Scaling studies: the layout planner (memory model + step-time ranking) and the scaling-law fits."""
