"""Distillation training: teacher cache, blockwise warm start, stochastic placements, evaluation."""
