"""The experiments: the series of steps (steps/ holds their prose), the check over seeds, screens, sweeps and their
spaces, and reproduce."""
