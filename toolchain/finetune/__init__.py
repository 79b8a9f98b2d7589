"""Fine-tuning: one training loop (train.py), one file per method, and the stage that ties them (stage.py)."""
