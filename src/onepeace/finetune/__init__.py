"""Fine-tuning and evaluation on the downstream tasks of ONE-PEACE (spec §8): task registry, task model, data."""
