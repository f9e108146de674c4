"""memscan: find, explain and mitigate prompts a diffusion model has memorized."""

__version__ = "0.1.0"
