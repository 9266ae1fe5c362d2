"""Prefect flows and the genpipe CLI: thin wiring around components/."""
