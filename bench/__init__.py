"""Benchmarks: each module is runnable (`python -m bench.NAME`) and writes its results
table, JSON and plot under bench/results/ (helpers in bench/common.py)."""
