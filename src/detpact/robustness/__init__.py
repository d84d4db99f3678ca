"""Robustness scenarios: image corruptions, subset rules, the scenario settings file."""
