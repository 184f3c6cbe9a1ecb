"""Scoring predictions: metrics, bootstrap intervals, error analysis, thresholds and the TF-IDF baseline."""
