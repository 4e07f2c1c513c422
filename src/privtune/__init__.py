"""privtune: fine-tune language models on sensitive data and measure the privacy,
utility and efficiency cost of each fine-tuning method, side by side."""

__version__ = "0.1.0"
