"""dinolabel."""
