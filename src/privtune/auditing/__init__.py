"""Empirical privacy audits: ε lower bounds from canaries, to set beside the accountant's ε."""
