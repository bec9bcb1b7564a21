"""The one trainer and what it needs: optimizer, checkpoints, distributed, tracking, budget matching."""
