"""Trainers: the RL loop (Stage 1 DAPO, Stage 3 PAPO) and its pieces."""
