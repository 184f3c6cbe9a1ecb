"""The data stage: read every source, map labels, clean, balance, sample and split, with counts of each step."""
