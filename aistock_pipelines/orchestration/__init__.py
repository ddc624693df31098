"""Dagster wiring (thin): assets, checks, jobs, schedules and sensors around the plain domain modules."""
