"""Training and evaluation engine: loops, losses, distributed setup."""
