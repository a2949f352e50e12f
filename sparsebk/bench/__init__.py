"""Benchmarks a user can rerun: each prints a table and writes JSON; none is a timed test."""
