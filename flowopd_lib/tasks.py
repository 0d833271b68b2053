"""The task labels every prompt carries: each routes its prompt to a teacher (Flow-OPD) and to the
rewards that judge it (the teacher trainers).

Neutral ground for the names the trainers, the prompt files (`data.py`) and the toy world's grammar
share, so that a trainer can check its config's tasks without importing the toy world.
"""
TASKS = ("geneval", "ocr", "pickscore", "deqa")

__all__ = ["TASKS"]
