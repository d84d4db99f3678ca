"""Detection heads."""
