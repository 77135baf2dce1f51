"""Drift from the reference: live measures, the drift budget, and the method comparison."""
