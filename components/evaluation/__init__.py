"""Judging generative models: the evaluator classifier, metrics (FID, KID, …) and sample grids."""
