"""The documentation from results/: the generated sections of the README and docs/, and the pictures of the evidence."""
