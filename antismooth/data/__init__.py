"""Data side: ImageFolder -> tar shards (shards.py) and shards -> batches (pipeline.py)."""
