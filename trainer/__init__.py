"""tokensel trainer: Hydra entry point, TRL adapters, tasks, tracking."""
