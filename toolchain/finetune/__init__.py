"""Fine-tuning: one training loop (train.py), one file per method, and what the finetune stage
(toolchain/stages/finetune.py) shares of them (methods.py)."""
