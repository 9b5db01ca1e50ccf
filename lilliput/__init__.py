"""lilliput: make language models small, fast and trustworthy, and prove it with measurements."""

__version__ = "0.1.0"
