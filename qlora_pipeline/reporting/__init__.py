"""What a run shows: per-split summaries, figures, the dashboard, the report, run comparison, trackers."""
